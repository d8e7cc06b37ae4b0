"""Every TRL dataset type in both forms, from every file type: the masks round-trip by decoding."""

import json

import datasets
import numpy as np
import pytest
import transformers

from align_jax.data import (
    DataError,
    PreferenceBatch,
    PromptBatch,
    SequenceBatch,
    UnpairedBatch,
    collate,
    default_buckets,
    detect_kind,
    encode,
    extract_prompt,
    truncate,
    unpair,
)
from tests.models.test_smollm2 import smollm2_gguf

USER = [{"role": "user", "content": "What is 2+2?"}]


def said(text):
    return [{"role": "assistant", "content": text}]


ROWS = {  # kind -> (standard row, conversational row)
    "language_modeling": ({"text": "the plot was good ."},
                          {"messages": USER + said("4")}),
    "prompt_completion": ({"prompt": "What is 2+2? ", "completion": "4"},
                          {"prompt": USER, "completion": said("4")}),
    "prompt_only": ({"prompt": "What is 2+2? ", "answer": 4},
                    {"prompt": USER, "answer": 4}),
    "preference": ({"prompt": "What is 2+2? ", "chosen": "4", "rejected": "5"},
                   {"prompt": USER, "chosen": said("4"), "rejected": said("5")}),
    "unpaired_preference": ({"prompt": "What is 2+2? ", "completion": "4", "label": True},
                            {"prompt": USER, "completion": said("4"), "label": True}),
}


def decode(tok, ids, mask):
    return tok.decode([int(i) for i, m in zip(ids, mask) if m])


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("conversational", [False, True])
def test_every_kind_in_both_forms_round_trips_through_the_masks(kind, conversational, tok,
                                                                tmp_path):
    row = ROWS[kind][conversational]
    encoded = encode(write(tmp_path / "data.jsonl", [row, row]), tok)
    assert (encoded.kind, encoded.conversational) == (kind, conversational)
    assert encoded.counts["prefix_mismatches"] == 0
    batch = collate(encoded.examples, kind, default_buckets(64), tok.pad_token_id)
    end = tok.eos_token
    if kind == "prompt_only":
        assert isinstance(batch, PromptBatch) and batch.columns == {"prompt": [row["prompt"]] * 2,
                                                                    "answer": [4, 4]}
        expected = (tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
                    if conversational else row["prompt"])
        assert decode(tok, batch.ids_BxP[0], batch.mask_BxP[0]) == expected
        assert batch.mask_BxP[0, -1] and not batch.mask_BxP[0, 0]  # left-padded
        return
    sequences = {"preference": lambda b: [b.chosen, b.rejected],
                 "unpaired_preference": lambda b: [b.sequences]}.get(kind, lambda b: [b])(batch)
    completions = {"preference": ["4", "5"],
                   "language_modeling": ["the plot was good ." if not conversational
                                         else None]}.get(kind, ["4"])
    for seq, completion in zip(sequences, completions):
        assert isinstance(seq, SequenceBatch) and seq.ids_BxT.shape == (2, 16)
        text = decode(tok, seq.ids_BxT[0], seq.completion_mask_BxT[0])
        whole = decode(tok, seq.ids_BxT[0], seq.attention_mask_BxT[0])
        if conversational and kind == "language_modeling":
            assert text == whole == tok.apply_chat_template(row["messages"], tokenize=False)
        elif conversational:
            # the assistant turn that follows the generation prompt
            assert text == f"{completion}{end}"
            assert whole == tok.apply_chat_template(USER + said(completion), tokenize=False)
        else:
            assert text == completion + end  # EOS appended, as TRL does
            assert whole == row.get("prompt", "") + completion + end
        assert not seq.attention_mask_BxT[0, -1]  # right-padded
        assert np.all(seq.attention_mask_BxT[0] >= seq.completion_mask_BxT[0])
    if kind == "unpaired_preference":
        assert isinstance(batch, UnpairedBatch) and batch.label_B.tolist() == [True, True]
    if kind == "preference":
        assert isinstance(batch, PreferenceBatch)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ""])
def test_every_file_type_loads(suffix, tok, tmp_path):
    rows = [{"prompt": f"What is {i}+{i}? ", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
            for i in range(5)]
    encoded = encode(write(tmp_path / f"prefs{suffix}", rows), tok)
    assert encoded.kind == "preference" and len(encoded.examples) == 5
    assert tok.decode(encoded.examples[3]["chosen_ids"]) == "6" + tok.eos_token


def test_in_memory_dataset_and_explicit_kind(tok):
    ds = datasets.Dataset.from_list([{"prompt": "a ", "completion": "b", "label": True}])
    assert encode(ds, tok).kind == "unpaired_preference"
    assert encode(ds, tok, kind="prompt_completion").kind == "prompt_completion"


@pytest.mark.parametrize("conversational", [False, True])
def test_implicit_prompt_is_the_shared_prefix(conversational, tok):
    if conversational:
        row = {"chosen": USER + said("4"), "rejected": USER + said("5")}
        assert extract_prompt(row["chosen"], row["rejected"]) == (USER, said("4"), said("5"))
    else:
        row = {"chosen": "What is 2+2? It is 4", "rejected": "What is 2+2? It is 5"}
        assert extract_prompt(row["chosen"], row["rejected"]) == ("What is 2+2? It is", " 4", " 5")
        assert extract_prompt("Q: hot or cold? hot", "Q: hot or cold? cold")[0] == "Q: hot or cold?"
    encoded = encode(datasets.Dataset.from_list([row]), tok)
    assert encoded.kind == "preference"
    batch = collate(encoded.examples, "preference", default_buckets(64), 0)
    chosen = decode(tok, batch.chosen.ids_BxT[0], batch.chosen.completion_mask_BxT[0])
    assert chosen.endswith("4" + tok.eos_token) and "2+2" not in chosen


def test_detect_kind_on_columns():
    assert detect_kind(["prompt", "chosen", "rejected", "score"], "x") == "preference"
    assert detect_kind(["messages"], "x") == "language_modeling"
    assert detect_kind(["prompt", "answer", "id"], "x") == "prompt_only"


def test_truncation_drops_long_prompts_and_cuts_completions_with_counts(tok, caplog):
    rows = [{"prompt": "x " * n, "completion": "y " * m} for n, m in [(2, 2), (40, 2), (4, 30)]]
    encoded = truncate(encode(datasets.Dataset.from_list(rows), tok), max_length=24)
    assert (encoded.counts["dropped_long_prompts"] == 1
            and encoded.counts["truncated_completions"] == 1)
    assert [e["truncated"] for e in encoded.examples] == [False, True]
    assert all(len(e["prompt_ids"]) + len(e["completion_ids"]) <= 24 for e in encoded.examples)
    assert ("1 of 3 rows dropped" in caplog.text
            and "1 of 3 rows with a truncated completion" in caplog.text)
    batch = collate(encoded.examples, "prompt_completion", default_buckets(24), 0)
    assert batch.ids_BxT.shape == (2, 24)
    with pytest.raises(DataError, match="every one of 3 rows has a prompt longer than 1 tokens"):
        truncate(encode(datasets.Dataset.from_list(rows), tok), max_length=24, max_prompt_length=1)


def test_real_chat_template_boundary_on_smollm2_tokenizer():
    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ds = datasets.Dataset.from_list([ROWS["preference"][True]])
    encoded = encode(ds, tok)
    assert encoded.counts["prefix_mismatches"] == 0
    ex = encoded.examples[0]
    assert tok.decode(ex["prompt_ids"] + ex["chosen_ids"]) == tok.apply_chat_template(
        USER + said("4"), tokenize=False)
    assert tok.decode(ex["chosen_ids"]).startswith("4<|im_end|>")


def test_unpair_gives_each_pair_as_a_desirable_and_an_undesirable_row():
    pairs = datasets.Dataset.from_list([
        {"prompt": "p0", "chosen": " a", "rejected": " b", "score_chosen": 1.0},
        {"prompt": "p1", "chosen": " c", "rejected": " d", "score_chosen": 2.0}])
    assert unpair(pairs).to_list() == [
        {"prompt": "p0", "completion": " a", "label": True},
        {"prompt": "p0", "completion": " b", "label": False},
        {"prompt": "p1", "completion": " c", "label": True},
        {"prompt": "p1", "completion": " d", "label": False}]
    with pytest.raises(DataError, match="pairs.jsonl: unpair needs an explicit prompt column"):
        unpair(datasets.Dataset.from_list([{"chosen": "x a", "rejected": "x b"}]), "pairs.jsonl")
