"""Synthetic tasks: deterministic, with rewards that match hand-computed truth."""

import numpy as np
import pytest
import transformers

from align_jax import rewards
from align_jax.data import encode
from align_jax.data import synthetic as syn
from align_jax.data.tiny_tokenizer import CHAT_TEMPLATE, tiny_tokenizer


def test_arithmetic_is_deterministic_and_answers_are_right():
    a, b = (syn.arithmetic(50, 7, digits=3, operators="+-*"),
            syn.arithmetic(50, 7, digits=3, operators="+-*"))
    assert a.to_list() == b.to_list() and a.to_list() != syn.arithmetic(50, 8).to_list()
    for row in a:
        question = row["prompt"].strip().splitlines()[-1]
        x, op, y = next((q.split(o)[0], o, q.split(o)[1]) for q in [question[8:-1]] for o in "+-*"
                        if o in q)
        assert 100 <= int(x) <= 999 and 100 <= int(y) <= 999
        assert row["answer"] == {"+": int(x) + int(y), "-": int(x) - int(y),
                                 "*": int(x) * int(y)}[op]
    with pytest.raises(ValueError, match="operators"):
        syn.arithmetic(1, 0, operators="/")


def test_arithmetic_rewards():
    good = "<think>2+2=4</think><answer>4</answer>"
    completions = [good, "<think>2+2=5</think><answer>5</answer>",
                   "the answer is <answer>4</answer>", "<answer>4</answer><think>x</think>",
                   [{"role": "assistant", "content": good}]]
    assert rewards.accuracy(completions, answer=[4] * 5) == [1, 0, 1, 1, 1]
    assert rewards.think_format(completions) == [1, 1, 0, 0, 1]
    rows = syn.arithmetic(20, 0, with_completion=True, conversational=True)
    assert rewards.accuracy(rows["completion"], rows["answer"]) == [1.0] * 20
    assert rewards.think_format(rows["completion"]) == [1.0] * 20


def test_sentiment_score_follows_the_grammar():
    assert syn.sentiment_score("the plot was good") == 1
    assert syn.sentiment_score("the plot was not good") == -1
    assert syn.sentiment_score("the plot was very awful but the music was really superb .") == \
        -4 + 3
    assert syn.sentiment_score("The acting was NOT very BRILLIANT") == -4
    assert syn.sentiment_score("goodness knows, badly lit") == 0  # whole words only
    rng = np.random.default_rng(0)
    for _ in range(200):  # every generated review parses to the score of its clauses
        clauses = [syn.review_clause(rng) for _ in range(3)]
        assert syn.sentiment_score(" and ".join(clauses)) == pytest.approx(
            sum(map(syn.sentiment_score, clauses)))
    rows = syn.sentiment(30, 1)
    assert rows.to_list() == syn.sentiment(30, 1).to_list()
    assert all(r["prompt"].startswith("Review: ") for r in rows)
    assert [r["prefix_score"] for r in rows] == [syn.sentiment_score(r["prompt"]) for r in rows]


def test_bradley_terry_labels_follow_the_true_reward():
    # With β = 1 the chosen one is the better one with probability σ(|Δr|) on average.
    prompts = syn.sentiment(3000, 0)
    pairs = syn.label_pairs(prompts, syn.sentiment_candidates, syn.sentiment_reward, seed=0,
                            beta=1.0)
    delta = np.array(pairs["score_chosen"]) - np.array(pairs["score_rejected"])
    expected = np.mean(1 / (1 + np.exp(-np.abs(delta[delta != 0]))))
    observed = np.mean(delta[delta != 0] > 0)
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / np.sum(delta != 0))
    assert pairs["score_chosen"] == syn.sentiment_reward(pairs["chosen"])
    hard = syn.label_pairs(prompts.select(range(200)), syn.sentiment_candidates,
                           syn.sentiment_reward, seed=0, beta=None)
    assert all(c > r for c, r in zip(hard["score_chosen"], hard["score_rejected"]))


def test_unpaired_labels_and_arithmetic_candidates(tok):
    prompts = syn.arithmetic(100, 3, conversational=True)
    rows = syn.label_unpaired(prompts, syn.arithmetic_candidates, rewards.accuracy, seed=0,
                              threshold=0.5)
    assert len(rows) == 200 and 0.1 < np.mean(rows["label"]) < 0.6
    assert rows["label"] == [s > 0.5 for s in rows["score"]]
    assert encode(rows, tok).kind == "unpaired_preference"  # a valid TRL dataset
    pairs = syn.label_pairs(prompts, syn.arithmetic_candidates, rewards.accuracy, seed=0, beta=None)
    assert len(pairs) > 50 and encode(pairs, tok).kind == "preference"


def test_tiny_tokenizer_round_trips_saves_and_splits_digits(tok, tmp_path):
    text = "<think>123+45=168</think><answer>168</answer> the plot was not very good ."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok("9876")["input_ids"]] == ["9", "8", "7", "6"]
    assert (tok.pad_token_id == 0 and tok.eos_token == "<|end|>"
            and tok.chat_template == CHAT_TEMPLATE)
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|user|>hi<|end|><|assistant|>"
    assert tiny_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


def test_arithmetic_filler_varies_length_not_reward():
    plain = syn.arithmetic(40, 5, with_completion=True)
    padded = syn.arithmetic(40, 5, with_completion=True, filler=6)
    assert plain["prompt"] == padded["prompt"]
    extra = [c.count(" .") for c in padded["completion"]]
    assert min(extra) == 0 and max(extra) == 6 and all(c.count(" .") == 0
                                                       for c in plain["completion"])
    assert rewards.accuracy(padded["completion"], padded["answer"]) == [1.0] * 40
    assert rewards.think_format(padded["completion"]) == [1.0] * 40


def test_sentiment_sft_set_and_length_biased_pairs():
    prompts = syn.sentiment(60, 3)
    sft = syn.sentiment(60, 3, with_completion=True)
    assert sft["prompt"] == prompts["prompt"]  # the completions draw from their own stream
    clauses = [c.count(" was ") for c in sft["completion"]]
    assert set(clauses) == {1, 2, 3} and all(c.startswith(" the ") and c.endswith(" .")
                                             for c in sft["completion"])
    every = syn.sentiment_pairs(300, 4, beta=None)
    longer = syn.sentiment_pairs(300, 4, beta=None, longer_chosen=True)
    words = lambda rows, key: [len(t.split()) for t in rows[key]]  # noqa: E731
    assert 0 < len(longer) < len(every)
    assert all(c > r for c, r in zip(words(longer, "chosen"), words(longer, "rejected")))
    assert all(sc > sr for sc, sr in zip(longer["score_chosen"], longer["score_rejected"]))
    kept = {(p, c) for p, c in zip(longer["prompt"], longer["chosen"])}
    # a filter, not a relabelling
    assert kept <= {(p, c) for p, c in zip(every["prompt"], every["chosen"])}
