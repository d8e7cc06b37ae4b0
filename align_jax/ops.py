"""Array primitives shared by every loss: token log-probs, masked reductions, entropy, KL.

Shape letters, one meaning each, used in array names across align_jax (`logits_BxTxV` is
[B, T, V]; a new meaning gets a new letter):

  B  batch rows: sequences, pairs or examples (B = N·G for sampled completions)
  N  prompts, each with a group of G samples
  G  samples per prompt
  T  tokens of a row (the sequence length)
  P  prompt tokens (the width of left-padded prompts)
  C  completion tokens (the width of sampled completions, or of packed chosen / rejected)
  S  key slots (the keys a query attends to; a KV cache's length)
  R  token rows, R = B·T (a batch's tokens as the rows of one matrix)
  V  vocabulary
  D  model width
  F  MLP width
  H  head width
  Q  query heads;  K  key/value heads;  J = Q/K query heads per key/value head
  L  layers
  E  experts
  M  micro-batches

All functions are pure, jittable and vmappable; masks are 0/1 (or bool) arrays broadcastable to
the value they mask, and a masked-out entry never influences a result or its gradient.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def token_logps(logits_BxTxV: Array, labels_BxT: Array) -> Array:
    """log softmax(logits)[label] per position, computed in float32.

    log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}. Only the log-normaliser (B×T) and the gathered
    logit (B×T) are formed, never a second B×T×V log-softmax array; bf16 logits are upcast inside
    the fused reduction, so the result is float32 whatever the logits' dtype.

    Args:
      logits_BxTxV: logits whose position t predicts labels_BxT[:, t] (shift beforehand).
      labels_BxT: integer token ids in [0, V).
    Returns:
      float32 [B, T] log-probabilities of the labels.
    """
    chex.assert_rank(logits_BxTxV, labels_BxT.ndim + 1)
    chex.assert_equal_shape_prefix((logits_BxTxV, labels_BxT), labels_BxT.ndim)
    chex.assert_type(labels_BxT, int)
    logits_f32 = logits_BxTxV.astype(jnp.float32)
    log_norm_BxT = jax.nn.logsumexp(logits_f32, axis=-1)
    label_logit_BxT = jnp.take_along_axis(logits_f32, labels_BxT[..., None], axis=-1)[..., 0]
    return label_logit_BxT - log_norm_BxT


def entropy_from_logits(logits_BxTxV: Array) -> Array:
    """Per-position entropy H = logsumexp(z) - Σ_v softmax(z)_v z_v, in float32. Returns [B, T]."""
    logits_f32 = logits_BxTxV.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits_f32, axis=-1)
    probs = jax.nn.softmax(logits_f32, axis=-1)
    return log_norm - jnp.sum(probs * logits_f32, axis=-1)


def map_chunks(fn: Callable, chunk: int, *xs_BxT: Array):
    """`fn` over consecutive chunks of `chunk` positions (axis 1), rematerialised in the backward.

    `fn` maps [B, c, …] arrays to a pytree of [B, c, …] arrays. `lax.map` runs the chunks one after
    another and `jax.checkpoint` keeps only each chunk's inputs for the backward pass, so `fn`'s
    intermediates (an LM head's [B, c, V] logits) exist for one chunk at a time, forward and
    backward. T is padded up to a multiple of `chunk`, and the padding sliced off the results.
    """
    B, T = xs_BxT[0].shape[:2]
    n = -(-T // chunk)

    def split(x):  # [B, T, …] -> [n, B, c, …]
        x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    def join(y):  # [n, B, c, …] -> [B, T, …]
        return jnp.moveaxis(y, 0, 1).reshape(B, n * chunk, *y.shape[3:])[:, :T]

    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(x) for x in xs_BxT))
    return jax.tree.map(join, out)


def head_token_stats(head: Callable[[Array], Array], hidden_BxTxD: Array, labels_BxT: Array, *,
                     chunk: int | None = None, temperature: float = 1.0, entropy: bool = False,
                     correct: bool = False) -> dict[str, Array]:
    """Per-token statistics of the logits z = head(hidden) / temperature, in float32, with no
    [B, T, V] array when `chunk` is set.

    `logps`: log softmax(z)[label] (`token_logps`); with `entropy`, H(softmax(z))
    (`entropy_from_logits`); with `correct`, whether argmax z is the label.

    Args:
      head: hidden states [B, c, D] -> logits [B, c, V] (e.g. `Decoder.logits`).
      hidden_BxTxD: the states whose logits predict `labels_BxT`.
      labels_BxT: integer token ids in [0, V).
      chunk: how many positions' logits exist at once, forward and backward (`map_chunks`);
        None: all T at once.
    Returns:
      {"logps": float32 [B, T], and "entropy" (float32) / "correct" (bool) [B, T] when asked}.
    """
    chex.assert_rank(labels_BxT, 2)

    def stats(hidden, labels):
        z = head(hidden).astype(jnp.float32)
        z = z / temperature if temperature != 1.0 else z
        out = {"logps": token_logps(z, labels)}
        if entropy:
            out["entropy"] = entropy_from_logits(z)
        if correct:
            out["correct"] = jnp.argmax(z, axis=-1) == labels
        return out

    if chunk is None or chunk >= labels_BxT.shape[1]:
        return stats(hidden_BxTxD, labels_BxT)
    return map_chunks(stats, chunk, hidden_BxTxD, labels_BxT)


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Σ x·mask over `axis` (all axes when None)."""
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Σ x·mask / Σ mask over `axis`; 0 where the mask is empty (never NaN)."""
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axis=axis, dtype=jnp.float32)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, axis=None, *, unbiased: bool = True) -> Array:
    """Variance of the masked entries; with `unbiased`, Bessel's correction n/(n-1) (as TRL)."""
    mask = jnp.broadcast_to(mask, x.shape)
    mean = masked_mean(x, mask, axis=axis)
    mean = mean if axis is None else jnp.expand_dims(mean, axis)
    var = masked_mean(jnp.square(x - mean), mask, axis=axis)
    if unbiased:
        count = jnp.sum(mask, axis=axis, dtype=jnp.float32)
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) variance over masked entries only.

    With `shift_mean=False` the mean is added back (as PPO reward whitening does). Masked-out
    entries are returned as 0.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def kl_k1(logps: Array, ref_logps: Array) -> Array:
    """Schulman's k1 = log π(y) - log π_ref(y): unbiased estimate of KL(π‖π_ref) for y ~ π."""
    return logps - ref_logps


def kl_k2(logps: Array, ref_logps: Array) -> Array:
    """Schulman's k2 = ½ (log π(y) - log π_ref(y))²: low variance, biased, always ≥ 0."""
    return 0.5 * jnp.square(logps - ref_logps)


def kl_k3(logps: Array, ref_logps: Array) -> Array:
    """Schulman's k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1: unbiased and ≥ 0.

    The estimator of GRPO's KL penalty (Shao et al. 2024, eq. 4; "Approximating KL Divergence",
    Schulman 2020).
    """
    log_ratio = ref_logps - logps
    return jnp.expm1(log_ratio) - log_ratio


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))



def cast_floating(tree, dtype, *, copy: bool = False):
    """Every floating-point leaf of `tree` as `dtype`, integer and boolean leaves unchanged; with
    `copy`, every leaf in a new buffer even where its dtype is already right."""
    return jax.tree.map(lambda x: jnp.array(x, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                            else x.dtype, copy=copy), tree)
