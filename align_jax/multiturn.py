"""Multi-turn rollouts: the sampler and one environment per sample take turns until every
trajectory is done, `max_turns` turns have run, or the cache's slots are spent (a trajectory
whose next observation does not fit in the slots left ends there).

    prompts (+ each environment's reset text) ──prefill──▶ cache
    repeat:  decode a turn from the cache ──▶ text ──▶ env.step ──▶ observation tokens
             ──extend──▶ cache (the rows that go on; earlier turns are never run again)

The trainer sees each trajectory as one completion after its prompt: the model's turns and the
observations between them, contiguous. `completion_mask` covers all of it (the context);
`model_mask` only the model's tokens, the ones that carry loss, KL and the sampler's log-probs.
Observations are rendered with the tokenizer's chat template (`observation_ids`) when the
prompts are conversations, else appended as plain text after the model's stop token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from align_jax.data.batching import bucket, default_buckets
from align_jax.envs import Environment, Observation, ToolEnvironment
from align_jax.sampling import (
    Completions,
    Decoding,
    SamplingConfig,
    compute_model,
    decode,
    encode_prompts,
    extend,
    prefill,
)

_MARK = "<<align_jax:end of turn>>"


class Turns(NamedTuple):
    """The sampler's three pieces a rollout calls, jitted, on device arrays."""

    start: Callable  # (prompt_ids_NxP, prompt_mask_NxP, num_samples, slots) -> Decoding
    decode: Callable  # (Decoding, key) -> (Completions, Decoding)
    extend: Callable  # (Decoding, ids_BxO, mask_BxO, resume_B) -> Decoding


def jit_turns(policy: Callable, config: SamplingConfig) -> Callable[..., Turns]:
    """`sampling.prefill`, `decode` and `extend` jitted on the model `policy(*args)` builds (in
    its compute dtype, `sampling.compute_model`); returns `bind(*args) -> Turns`."""
    start = jax.jit(lambda args, ids, mask, G, slots: prefill(policy(*args), ids, mask,
                                                               num_samples=G, slots=slots),
                    static_argnums=(3, 4))
    turn = jax.jit(lambda args, d, key: decode(policy(*args), d, key, config))
    more = jax.jit(lambda args, d, ids, mask, resume: extend(policy(*args), d, ids, mask, resume))
    return lambda *args: Turns(functools.partial(start, args), functools.partial(turn, args),
                               functools.partial(more, args))


def observation_ids(tokenizer, observation: Observation, conversational: bool,
                    stop_texts: Sequence[str]) -> list[int]:
    """The tokens that follow a model turn's stop token for the model to read `observation`: in
    a conversation, what the chat template writes after an assistant turn's end for these
    messages (a string is a user message) and the next generation prompt; else the text."""
    if observation is None:
        return []
    if not conversational:
        text = (observation if isinstance(observation, str)
                else "\n".join(m["content"] for m in observation))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = ([{"role": "user", "content": observation}] if isinstance(observation, str)
                else list(observation))
    head = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(head + messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError, or a template that refuses the role
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} cannot render the "
                         f"observation {messages!r}: {e}") from None
    after = text[text.index(_MARK) + len(_MARK):]
    end = max((s for s in stop_texts if s and after.startswith(s)), key=len, default=None)
    if end is None:
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not end an "
                         f"assistant turn with a stop token {list(stop_texts)}; it writes "
                         f"{after[:40]!r}")
    return tokenizer(after[len(end):], add_special_tokens=False)["input_ids"]


def reset_prompts(environments: Sequence[Environment], rows: Sequence[dict], G: int
                  ) -> list | None:
    """Reset each sample's environment with its prompt's row; the prompts with what the resets
    returned appended (to the last user message of a conversation), or None when none returned
    text. ValueError when the G samples of a prompt were given different text (a group shares its
    prompt)."""
    texts = [env.reset(row) for env, row in zip(environments, rows)]
    if not any(texts):
        return None
    prompts = []
    for i in range(0, len(rows), G):
        if len(set(texts[i:i + G])) > 1:
            raise ValueError(f"the environments of prompt {i // G} returned different reset "
                             f"text for its {G} samples; the samples of a group share a prompt")
        prompt, extra = rows[i]["prompt"], texts[i] or ""
        if isinstance(prompt, str):
            prompts.append(prompt + extra)
        else:
            last = max(k for k, m in enumerate(prompt) if m["role"] == "user")
            prompts.append([dict(m, content=m["content"] + extra) if k == last else m
                            for k, m in enumerate(prompt)])
    return prompts


@dataclasses.dataclass
class Trajectory:
    """One sample's tokens after its prompt, in order, and what its environment said."""

    ids: list = dataclasses.field(default_factory=list)
    model: list = dataclasses.field(default_factory=list)  # True on the model's tokens
    logps: list = dataclasses.field(default_factory=list)
    text: str = ""  # the last model turn
    reward: float | None = None
    turns: int = 0
    truncated: bool = False

    def add(self, ids, logps=None) -> None:
        self.ids += list(ids)
        self.model += [logps is not None] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)


def take_turn(trajectories: list[Trajectory], environments: Sequence[Environment],
              out: Completions, active: np.ndarray, decode_text: Callable) -> list:
    """Record a decoded turn and step each active environment; returns each row's observation
    for the next turn (None for rows that are done: their environment said so, or their turn
    ran out of tokens before its stop token)."""
    ids, mask, logps, truncated = jax.device_get((out.ids_BxC, out.mask_BxC, out.logps_BxC,
                                                  out.truncated_B))
    observations: list = [None] * len(trajectories)
    for b in np.flatnonzero(active):
        t = trajectories[b]
        t.add(ids[b][mask[b]], logps[b][mask[b]])
        t.text, t.turns, t.truncated = decode_text(ids[b][mask[b]]), t.turns + 1, bool(truncated[b])
        observation, reward, done = environments[b].step(t.text)
        if reward is not None:
            t.reward = (t.reward or 0.0) + float(reward)
        active[b] = not (done or t.truncated)
        observations[b] = observation if active[b] else None
    return observations


def rollout(turns: Turns, tokenizer, environments: Sequence[Environment], prompt_ids_NxP,
            prompt_mask_NxP, key, *, num_samples: int, max_turns: int, slots: int,
            conversational: bool, stop_ids: Sequence[int]) -> list[Trajectory]:
    """Each of the B = N·G samples' trajectory: turns of the sampler (`turns`) and of its
    environment, from the prompts (left-padded, a prompt's G samples contiguous), within
    `max_turns` turns and a cache of `slots` slots (the prompt's and every token after it)."""
    B = len(environments)
    stop_texts = tokenizer.convert_ids_to_tokens(list(stop_ids))
    trajectories, active = [Trajectory() for _ in range(B)], np.ones(B, bool)
    d: Decoding = turns.start(prompt_ids_NxP, prompt_mask_NxP, num_samples, slots)

    def decode_text(ids):
        return tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    for turn in range(max_turns):
        out, d = turns.decode(d, jax.random.fold_in(key, turn))
        observations = take_turn(trajectories, environments, out, active, decode_text)
        if turn == max_turns - 1 or not active.any():
            break
        ids = [observation_ids(tokenizer, o, conversational, stop_texts) if a else []
               for o, a in zip(observations, active)]
        room = slots - int(d.cache.index) - 1  # one slot at least for the next turn
        active &= np.array([len(x) <= room for x in ids])  # an observation that does not fit ends
        if not active.any():
            break
        ids = [x if a else [] for x, a in zip(ids, active)]
        width = min(bucket(max(max(map(len, ids)), 1), default_buckets(slots, smallest=8)), room)
        block = np.array([[tokenizer.pad_token_id or 0] * (width - len(x)) + x for x in ids],
                         np.int32)
        block_mask = np.array([[False] * (width - len(x)) + [True] * len(x) for x in ids])
        d = turns.extend(d, block, block_mask, active.copy())
        for t, x, a in zip(trajectories, ids, active):
            if a:
                t.add(x)
    return trajectories


def play(model, tokenizer, rows: Sequence[dict], environments: Sequence[Environment], rng,
         config: SamplingConfig, *, max_turns: int, rollout_tokens: int,
         tools: list[dict] | None = None) -> list[Trajectory]:
    """`model`'s trajectories outside training (evaluation, inspection): for each row (with its
    "prompt", text or chat messages rendered with the JSON schemas of `tools`),
    G = `config.num_samples` samples, each with its own environment (`environments` holds B = N·G,
    a row's G contiguous), within `max_turns` turns and `rollout_tokens` tokens after the prompt.
    Stops at `config.stop_token_ids`, else at the tokenizer's EOS."""
    G = config.num_samples
    expanded = [row for row in rows for _ in range(G)]
    prompts = reset_prompts(environments, expanded, G) or [row["prompt"] for row in rows]
    ids, mask = encode_prompts(tokenizer, prompts, pad_token_id=config.pad_token_id, tools=tools)
    stop_ids = config.stop_token_ids or (tokenizer.eos_token_id,)
    graphdef, state = nnx.split(model)
    turns = jit_turns(lambda s: compute_model(graphdef, s),
                      dataclasses.replace(config, stop_token_ids=tuple(stop_ids)))(state)
    return rollout(turns, tokenizer, environments, ids, mask, rng, num_samples=G,
                   max_turns=max_turns, slots=ids.shape[1] + rollout_tokens,
                   conversational=not isinstance(prompts[0], str), stop_ids=stop_ids)


def layout(trajectories: Sequence[Trajectory], pad_id: int, buckets: Sequence[int]) -> dict:
    """Host arrays of the trajectories as completions after their prompts, right-padded to the
    smallest bucket that holds the longest: completion_ids, completion_mask (every token),
    model_mask (the model's), logps (the sampler's; 0 elsewhere), truncated, turns."""
    C = bucket(max(max(len(t.ids) for t in trajectories), 1), buckets)

    def pad(values, fill, dtype):
        return np.array([list(v) + [fill] * (C - len(v)) for v in values], dtype)

    return {"completion_ids": pad((t.ids for t in trajectories), pad_id, np.int32),
            "completion_mask": pad(([True] * len(t.ids) for t in trajectories), False, bool),
            "model_mask": pad((t.model for t in trajectories), False, bool),
            "logps": pad((t.logps for t in trajectories), 0.0, np.float32),
            "truncated": np.array([t.truncated for t in trajectories]),
            "turns": np.array([t.turns for t in trajectories])}


def metrics(trajectories: Sequence[Trajectory], environments: Sequence) -> dict[str, float]:
    """Turns per trajectory, and TRL's tool metrics when the environments run tools: calls per
    sample (`tools/call_frequency`) and the fraction of calls that failed
    (`tools/failure_frequency`)."""
    out = {"turns/mean": float(np.mean([t.turns for t in trajectories])),
           "turns/max": float(max(t.turns for t in trajectories))}
    tooled = [e for e in environments if isinstance(e, ToolEnvironment)]
    if tooled:
        calls, failures = sum(e.calls for e in tooled), sum(e.failures for e in tooled)
        out.update({"tools/call_frequency": calls / len(environments),
                    "tools/failure_frequency": failures / calls if calls else 0.0})
    return out
