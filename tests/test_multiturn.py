"""Multi-turn rollouts: observation tokens from the chat template, the trajectory layout and its
masks, and the cached sampler's log-probs against the trainer's pass over the whole trajectory."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax import envs, multiturn
from align_jax.data import agentic, encode
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import Decoder
from align_jax.models.registry import config_from_init
from align_jax.sampling import SamplingConfig, compute_model, encode_prompts, generate_from_text
from align_jax.train import online

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def render(tok, messages):
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_observation_tokens_continue_the_chat_template_after_the_stop_token(tok):
    """prompt + reply + <|end|> + observation tokens = the template's rendering of the whole
    conversation with the next generation prompt, token for token."""
    prompt = agentic.guess_number(1, seed=0)[0]["prompt"]
    reply = "16"
    ids = (render(tok, prompt)
           + tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
           + multiturn.observation_ids(tok, "Higher.", True, ["<|end|>"]))
    whole = prompt + [{"role": "assistant", "content": reply}, {"role": "user",
                                                                 "content": "Higher."}]
    assert ids == render(tok, whole)
    # plain text is appended as it is; None adds nothing
    assert tok.decode(multiturn.observation_ids(tok, "Higher.", False, [])) == "Higher."
    assert multiturn.observation_ids(tok, None, True, ["<|end|>"]) == []


def test_observation_tokens_of_tool_messages_in_chatml(tok):
    chatml = copy.copy(tok)
    chatml.chat_template = CHATML
    ids = multiturn.observation_ids(chatml, [{"role": "tool", "content": "84"}], True,
                                    ["<|im_end|>"])
    assert tok.decode(ids) == "\n<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="does not end an assistant turn with a stop token"):
        multiturn.observation_ids(chatml, "x", True, ["<|end|>"])


def test_reset_text_is_appended_to_the_last_user_message_and_shared_by_a_group():
    class Hint:
        def __init__(self, text):
            self.text = text

        def reset(self, row):
            return self.text

    rows = [{"prompt": [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "?"}]},
            {"prompt": "Go."}]
    prompts = multiturn.reset_prompts([Hint(" A"), Hint(" A"), Hint(" B"), Hint(" B")],
                                      [rows[0], rows[0], rows[1], rows[1]], 2)
    assert prompts == [[{"role": "user", "content": "Go. A"}, {"role": "assistant",
                                                                 "content": "?"}], "Go. B"]
    assert multiturn.reset_prompts([Hint(None)] * 2, [rows[1]] * 2, 2) is None
    with pytest.raises(ValueError, match="prompt 0 returned different reset text"):
        multiturn.reset_prompts([Hint("a"), Hint("b")], [rows[1]] * 2, 2)


STOP_IDS = (1, *range(5, 100))  # <|end|> and many more, so that a random model ends its turns


@pytest.fixture(scope="module")
def chatty(tok):
    """(a random tiny model, its jitted turns, their settings): it stops at any of a hundred
    tokens, so its turns are short and of different lengths."""
    config = config_from_init({"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 512})
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    sampling = SamplingConfig(max_new_tokens=6, num_samples=2, temperature=0.9,
                              stop_token_ids=STOP_IDS, pad_token_id=tok.pad_token_id)
    turns = multiturn.jit_turns(lambda s: compute_model(graphdef, s), sampling)(state)
    return model, turns, sampling


def test_trajectories_mask_the_environment_and_match_the_trainers_log_probs(tok, chatty):
    """Guess the number with a random tiny model, its rows taking several turns of different
    lengths: the environment's tokens are exactly its rendered
    replies, carry no log-prob and no model mask, and the sampler's log-probs of the model's
    tokens (decoded from the cache, turn after turn) equal a teacher-forced pass of the policy
    over prompt + whole trajectory."""
    model, turns, sampling = chatty
    rows = agentic.guess_number(3, seed=4)
    ids, mask = encode_prompts(tok, rows["prompt"], buckets=(96,))
    environments = [agentic.GuessNumber() for _ in range(6)]
    for env, row in zip(environments, [r for r in rows for _ in range(2)]):
        env.reset(row)
    trajectories = multiturn.rollout(turns, tok, environments, ids, mask, jax.random.key(2),
                                     num_samples=2, max_turns=4, slots=96 + 96,
                                     conversational=True, stop_ids=STOP_IDS)
    assert max(t.turns for t in trajectories) == 4 and len({len(t.ids) for t in trajectories}) > 1
    out = multiturn.layout(trajectories, tok.pad_token_id, (64, 128))
    replies = {tuple(multiturn.observation_ids(tok, o, True, ["<|end|>"]))
               for o in ("Higher.", "Lower.", "Reply with one number.")}
    for b, t in enumerate(trajectories):
        context, own = out["completion_mask"][b], out["model_mask"][b]
        assert context.sum() == len(t.ids) and not np.any(own & ~context)
        env_runs = np.split(out["completion_ids"][b], np.flatnonzero(np.diff(own)) + 1)
        env_runs = [tuple(r) for r, flag in zip(env_runs, np.split(own & context, np.flatnonzero(
            np.diff(own)) + 1)) if not flag[0] and r[0] != tok.pad_token_id]
        assert len(env_runs) == t.turns - 1 and set(env_runs) <= replies
    assert np.all(out["logps"][~out["model_mask"]] == 0)
    rollout = online.Rollout(jnp.repeat(ids, 2, 0), jnp.repeat(mask, 2, 0),
                             jnp.asarray(out["completion_ids"]),
                             jnp.asarray(out["completion_mask"]),
                             jnp.asarray(out["model_mask"]), jnp.asarray(out["logps"]),
                             jnp.zeros(6))
    teacher, _ = online.policy_outputs(model, rollout, sampling.temperature)
    m = out["model_mask"]
    np.testing.assert_allclose(np.asarray(teacher)[m], out["logps"][m], atol=2e-5)


def test_a_trajectory_whose_observation_does_not_fit_ends_and_the_others_go_on(tok, chatty):
    """200 words do not fit in the 64 slots after the prompt: that sample ends after its turn,
    while its neighbour, told three words, takes all three turns."""
    class Talk:
        def __init__(self, words):
            self.words = words

        def reset(self, row):
            return None

        def step(self, completion):
            return " ".join(["word"] * self.words), None, False

    _, turns, _ = chatty
    ids, mask = encode_prompts(tok, ["Talk."], buckets=(16,))
    environments = [Talk(200), Talk(3)]
    trajectories = multiturn.rollout(turns, tok, environments, ids, mask, jax.random.key(0),
                                     num_samples=2, max_turns=3, slots=16 + 64,
                                     conversational=False, stop_ids=STOP_IDS)
    assert [t.turns for t in trajectories] == [1, 3]
    assert trajectories[1].model.count(False) == 2 * len(tok("word word word")["input_ids"])


def test_prompts_carry_the_tools_schemas_where_the_template_renders_them(tok):
    """A template that lays out `tools` (as Qwen's and Llama 3.1's do) gets each tool's JSON
    schema, at load time and when a reset re-encodes the prompts."""
    templated = copy.copy(tok)
    templated.chat_template = ("{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
                               + tok.chat_template)
    rows = agentic.tool_arithmetic(2, seed=0)
    schema = envs.tool_schema(agentic.calculator)
    encoded = encode(rows, templated, kind="prompt_only", tools=[schema])
    ids, _ = encode_prompts(templated, rows["prompt"], buckets=(512,), tools=[schema])
    for example, row in zip(encoded.examples, np.asarray(ids)):
        text = templated.decode(example["prompt_ids"])
        assert text.startswith("<|system|>[{") and "Evaluate an arithmetic expression" in text
        assert templated.decode([t for t in row if t != tok.pad_token_id]) == text
    assert "Evaluate" not in tok.decode(encode(rows, tok, kind="prompt_only",
                                                 tools=[schema]).examples[0]["prompt_ids"])


def test_play_first_turns_are_the_single_turn_samplers_replies(tok, chatty):
    """`play` (a model's trajectories outside training), greedy: each trajectory starts with the
    reply `generate_from_text` gives its prompt, and goes on where the game does."""
    model, _, sampling = chatty
    greedy = dataclasses.replace(sampling, greedy=True, num_samples=1)
    rows = list(agentic.guess_number(3, seed=5))
    environments = [agentic.GuessNumber() for _ in rows]
    trajectories = multiturn.play(model, tok, rows, environments, jax.random.key(0), greedy,
                                  max_turns=3, rollout_tokens=48)
    replies, out = generate_from_text(model, tok, [r["prompt"] for r in rows], jax.random.key(1),
                                      greedy)
    for t, reply, ids, mask in zip(trajectories, replies, *jax.device_get((out.ids_BxC,
                                                                          out.mask_BxC))):
        first = list(ids[mask])
        assert t.ids[:len(first)] == first and all(t.model[:len(first)])
        assert t.turns == 1 or tok.decode(first, skip_special_tokens=True) == reply
    assert max(t.turns for t in trajectories) > 1
