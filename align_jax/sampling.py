"""Jitted batched generation with a KV cache, returning the log-probs the trainer will compute.

One compiled program per (batch, prompt length, settings): a prefill over the left-padded prompt,
then a `lax.while_loop` of one-token steps that ends as soon as every row has emitted a stop
token. The same pieces continue a conversation over turns: `prefill` the prompts, `decode` a
turn, `extend` every row with the tokens that come between turns (an environment's reply), and
`decode` again from the cache, never re-running earlier turns. The returned per-token log-probs
are log softmax(logits / temperature) of the sampled tokens over the full vocabulary, exactly
what the trainer computes on the same tokens, so top-k / top-p / min-p shape only which tokens
are drawn, never the log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax import ops
from align_jax.data.batching import bucket
from align_jax.models.decoder import Decoder, KVCache, init_cache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Generation settings. top_k=0, top_p=1 and min_p=0 disable those filters."""

    max_new_tokens: int
    num_samples: int = 1  # G completions per prompt; rows of one prompt are contiguous
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()  # EOS and any extra stop tokens
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError("max_new_tokens and num_samples must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            raise ValueError(f"invalid filters top_k={self.top_k}, top_p={self.top_p}, "
                             f"min_p={self.min_p}")


class Completions(NamedTuple):
    """Generated tokens for B = N·G rows, N prompts × G samples (a prompt's samples are
    contiguous)."""

    ids_BxC: Array  # pad_token_id after the stop token
    mask_BxC: Array  # True on generated tokens up to and including the stop token
    logps_BxC: Array  # log softmax(logits / temperature) of each generated token; 0 where masked
    lengths_B: Array
    truncated_B: Array  # True where no stop token came within max_new_tokens


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> Array:
    """Set to -inf every token outside top-k, outside the top-p nucleus, or below min_p·p_max.

    Applied in that order, as transformers' logits warpers; the most likely token always stays.
    """
    neg_inf = jnp.finfo(logits_BxV.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg_inf, logits_BxV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold, neg_inf, logits_BxV)
    if min_p > 0.0:
        probs = jax.nn.softmax(logits_BxV, axis=-1)
        keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits_BxV = jnp.where(keep, logits_BxV, neg_inf)
    return logits_BxV


def sample_categorical(key: Array, logits_BxV: Array) -> Array:
    """One draw per row from softmax(logits) by inverting its CDF: the token j with
    c_{j-1} ≤ u < c_j, where c is the cumulative probability and u ~ U[0, c_V).

    Exact like the Gumbel-max trick, but with one random number per row instead of V (on CPU,
    generating B·V Gumbel variates costs more than the rest of the sampling step). A token of
    probability zero is never drawn, since its c_j equals c_{j-1}.
    """
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = jax.random.uniform(key, (logits_BxV.shape[0], 1)) * cdf_BxV[:, -1:]
    token = jnp.sum(cdf_BxV <= u_Bx1, axis=-1, dtype=jnp.int32)
    # u·c_V may round up to c_V; fall back to the last token that has probability.
    last_possible = logits_BxV.shape[-1] - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)
    return jnp.minimum(token, last_possible)


def _next_token(logits_BxV, key, config: SamplingConfig):
    scaled = logits_BxV.astype(jnp.float32) / config.temperature
    logps_BxV = jax.nn.log_softmax(scaled, axis=-1)
    if config.greedy:
        token = jnp.argmax(scaled, axis=-1)
    else:
        filtered = filter_logits(scaled, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p)
        token = sample_categorical(key, filtered)
    return token, jnp.take_along_axis(logps_BxV, token[:, None], axis=-1)[:, 0]


class Decoding(NamedTuple):
    """Where B rows of generation stand between calls: the KV cache of every token so far, each
    row's next-token logits, and the rows that are finished (they generate nothing more)."""

    cache: KVCache
    logits_BxV: Array
    done_B: Array


def compute_model(graphdef, state) -> Decoder:
    """The model of (graphdef, state) with its weights in the compute dtype, so that a bf16 model
    reads half the bytes per token (its KV cache is in that dtype too)."""
    model = nnx.merge(graphdef, state)
    return nnx.merge(graphdef, ops.cast_floating(state, model.dtype))


def prefill(model: Decoder, prompt_ids_NxP: Array, prompt_mask_NxP: Array, *, num_samples: int,
            slots: int) -> Decoding:
    """Each left-padded prompt run once, with logits at its last position only, then its cache
    copied to its G = `num_samples` rows (B = N·G, a prompt's rows contiguous); the cache has
    `slots` slots (the prompt's P and every token to come)."""
    G = num_samples
    N, _ = prompt_ids_NxP.shape
    cache = init_cache(model.config, N, slots, model.dtype)
    hidden, cache = model.hidden_states(prompt_ids_NxP, prompt_mask_NxP, cache)
    logits = model.logits(hidden[:, -1])
    if G > 1:
        logits = jnp.repeat(logits, G, axis=0)
        cache = cache._replace(keys_LxBxKxSxH=jnp.repeat(cache.keys_LxBxKxSxH, G, axis=1),
                               values_LxBxKxSxH=jnp.repeat(cache.values_LxBxKxSxH, G, axis=1),
                               key_mask_BxS=jnp.repeat(cache.key_mask_BxS, G, axis=0))
    return Decoding(cache, logits, jnp.zeros((N * G,), bool))


def decode(model: Decoder, d: Decoding, rng: Array, config: SamplingConfig
           ) -> tuple[Completions, Decoding]:
    """Up to C = `config.max_new_tokens` tokens (fewer when the cache has fewer free slots) for
    every row not done, in a `lax.while_loop` that ends as soon as every row has emitted a stop
    token. A row's tokens up to and including its stop token are written to the cache; the slots
    of the steps after it are masked, so a later `extend` continues each row where it stopped."""
    B, C = d.done_B.shape[0], config.max_new_tokens
    limit = jnp.minimum(C, d.cache.key_mask_BxS.shape[1] - d.cache.index)
    stop_ids = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < limit) & ~jnp.all(done)

    def body(carry):
        step, cache, last_logits, ids, logps, done, key = carry
        key, sub = jax.random.split(key)
        token, logp = _next_token(last_logits, sub, config)
        active = ~done
        ids = ids.at[:, step].set(jnp.where(active, token, config.pad_token_id))
        logps = logps.at[:, step].set(jnp.where(active, logp, 0.0))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = model(token[:, None], active[:, None], cache)
        return step + 1, cache, logits[:, -1], ids, logps, done, key

    init = (jnp.zeros((), jnp.int32), d.cache, d.logits_BxV,
            jnp.full((B, C), config.pad_token_id, jnp.int32), jnp.zeros((B, C), jnp.float32),
            d.done_B, rng)
    steps, cache, logits, ids, logps, done, _ = jax.lax.while_loop(cond, body, init)
    # A row's tokens are those it drew while active: up to and including its first stop token.
    drawn = (jnp.arange(C)[None, :] < steps) & ~d.done_B[:, None]
    is_stop = jnp.isin(ids, stop_ids) & drawn
    mask = drawn & (jnp.cumsum(is_stop, axis=1) - is_stop == 0)
    out = Completions(jnp.where(mask, ids, config.pad_token_id), mask,
                      jnp.where(mask, logps, 0.0), jnp.sum(mask, axis=1), ~done)
    return out, Decoding(cache, logits, done)


def extend(model: Decoder, d: Decoding, ids_BxO: Array, mask_BxO: Array, resume_B: Array
           ) -> Decoding:
    """Append O tokens to each row (left-padded: a row's last token in the last slot) after what
    it has, and take its next-token logits there; rows with `resume_B` set generate again, the
    others are done. A row given no token keeps the logits it had."""
    hidden, cache = model.hidden_states(ids_BxO, mask_BxO, d.cache)
    logits = jnp.where(jnp.any(mask_BxO, axis=1)[:, None], model.logits(hidden[:, -1]),
                       d.logits_BxV)
    return Decoding(cache, logits, ~resume_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def generate_params(graphdef, state, prompt_ids_NxP, prompt_mask_NxP, rng, *,
                    config: SamplingConfig) -> Completions:
    """`generate` on a model given as (graphdef, state): what a jitted or vmapped caller uses."""
    model = compute_model(graphdef, state)
    start = prefill(model, prompt_ids_NxP, prompt_mask_NxP, num_samples=config.num_samples,
                    slots=prompt_ids_NxP.shape[1] + config.max_new_tokens)
    return decode(model, start, rng, config)[0]


def generate(model: Decoder, prompt_ids_NxP: Array, prompt_mask_NxP: Array, rng: Array,
             config: SamplingConfig) -> Completions:
    """Sample `config.num_samples` completions for each left-padded prompt.

    Deterministic for a given key. Works with sharded parameters: the program is compiled for
    whatever placement the model's state has.
    """
    graphdef, state = nnx.split(model)
    return generate_params(graphdef, state, jnp.asarray(prompt_ids_NxP),
                           jnp.asarray(prompt_mask_NxP), rng, config=config)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "temperature"))
def _sequence_kl(graphdef, state, prompt_ids_NxP, prompt_mask_NxP, out: Completions, *,
                 num_samples: int, temperature: float):
    reference = nnx.merge(graphdef, state)
    prompt_ids = jnp.repeat(prompt_ids_NxP, num_samples, axis=0)
    ids = jnp.concatenate([prompt_ids, out.ids_BxC], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask_NxP, num_samples, axis=0), out.mask_BxC], axis=1)
    P = prompt_ids.shape[1]
    hidden_BxTxD, _ = reference.hidden_states(ids, mask)
    ref_logps = ops.head_token_stats(reference.logits, hidden_BxTxD[:, P - 1:-1], out.ids_BxC,
                                     chunk=reference.logits_chunk,
                                     temperature=temperature)["logps"]
    return jnp.sum(jnp.where(out.mask_BxC, out.logps_BxC - ref_logps, 0.0), axis=1)


def sequence_kl(reference: Decoder, prompt_ids_NxP: Array, prompt_mask_NxP: Array,
                out: Completions, *, num_samples: int, temperature: float = 1.0) -> Array:
    """k1 = Σ_t log π(y_t) − log π_ref(y_t) for each completion y ~ π in `out` [B = N·G]: its mean
    is the sequence-level KL(π ‖ π_ref). π's log-probs are the sampler's (at `temperature`), π_ref's
    a teacher-forced pass of `reference` over the same left-padded prompts and completions."""
    graphdef, state = nnx.split(reference)
    return _sequence_kl(graphdef, state, jnp.asarray(prompt_ids_NxP), jnp.asarray(prompt_mask_NxP),
                        out, num_samples=num_samples, temperature=temperature)


PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], *, pad_token_id: int = 0,
                   buckets: Sequence[int] = PROMPT_BUCKETS, tools: list[dict] | None = None
                   ) -> tuple[Array, Array]:
    """Prompts (plain text, or chat messages rendered with the tokenizer's chat template and the
    JSON schemas of `tools`) → left-padded (ids_BxP, mask_BxP) for `generate`, P the smallest
    bucket that fits them all."""
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(
        p, tokenize=False, add_generation_prompt=True, tools=tools) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = bucket(max(len(e) for e in encoded), buckets)  # a handful of prompt shapes per run
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_token_id
    ids = jnp.asarray([[pad] * (width - len(e)) + e for e in encoded], jnp.int32)
    mask = jnp.asarray([[0] * (width - len(e)) + [1] * len(e) for e in encoded], bool)
    return ids, mask


def generate_from_text(model: Decoder, tokenizer, prompts: Sequence[str | list[dict]], rng: Array,
                       config: SamplingConfig, *, buckets: Sequence[int] = PROMPT_BUCKETS
                       ) -> tuple[list[str], Completions]:
    """`generate` on text prompts (see `encode_prompts`), stopping at the tokenizer's EOS unless
    `config.stop_token_ids` says otherwise: (decoded completions, the `Completions` with their token
    ids and log-probs). Rows are prompt-major: the G samples of prompt i are at i·G … i·G+G-1."""
    ids, mask = encode_prompts(tokenizer, prompts, pad_token_id=config.pad_token_id,
                               buckets=buckets)
    if not config.stop_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, stop_token_ids=(tokenizer.eos_token_id,))
    out = generate(model, ids, mask, rng, config)
    ids_BxC, mask_BxC = jax.device_get((out.ids_BxC, out.mask_BxC))  # one transfer, not per token
    texts = [tokenizer.decode(row[row_mask].tolist(), skip_special_tokens=True)
             for row, row_mask in zip(ids_BxC, mask_BxC)]
    return texts, out


def generate_text(model: Decoder, tokenizer, prompts: Sequence[str | list[dict]], rng: Array,
                  config: SamplingConfig, *, buckets: Sequence[int] = PROMPT_BUCKETS) -> list[str]:
    """Prompts (plain text, or chat messages rendered with the tokenizer's chat template) in,
    decoded completions out (prompt-major: the G samples of prompt i are at i·G … i·G+G-1)."""
    return generate_from_text(model, tokenizer, prompts, rng, config, buckets=buckets)[0]
