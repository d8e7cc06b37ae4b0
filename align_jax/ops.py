"""Array primitives shared by every loss: token log-probs, masked reductions, entropy, KL.

Shape letters used in names across align_jax: B batch (sequences or pairs), L sequence length,
V vocabulary, G group size (samples per prompt), N number of groups (prompts), D model width.
All functions are pure, jittable and vmappable; masks are 0/1 (or bool) arrays broadcastable to
the value they mask, and a masked-out entry never influences a result or its gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def token_logps(logits_BxLxV: Array, labels_BxL: Array) -> Array:
    """log softmax(logits)[label] per position, computed in float32.

    log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}. Only the log-normaliser (B×L) and the gathered
    logit (B×L) are formed, never a second B×L×V log-softmax array; bf16 logits are upcast inside
    the fused reduction, so the result is float32 whatever the logits' dtype.

    Args:
      logits_BxLxV: logits whose position t predicts labels_BxL[:, t] (shift beforehand).
      labels_BxL: integer token ids in [0, V).
    Returns:
      float32 [B, L] log-probabilities of the labels.
    """
    chex.assert_rank(logits_BxLxV, labels_BxL.ndim + 1)
    chex.assert_equal_shape_prefix((logits_BxLxV, labels_BxL), labels_BxL.ndim)
    chex.assert_type(labels_BxL, int)
    logits_f32 = logits_BxLxV.astype(jnp.float32)
    log_norm_BxL = jax.nn.logsumexp(logits_f32, axis=-1)
    label_logit_BxL = jnp.take_along_axis(logits_f32, labels_BxL[..., None], axis=-1)[..., 0]
    return label_logit_BxL - log_norm_BxL


def entropy_from_logits(logits_BxLxV: Array) -> Array:
    """Per-position entropy H = logsumexp(z) - Σ_v softmax(z)_v z_v, in float32. Returns [B, L]."""
    logits_f32 = logits_BxLxV.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits_f32, axis=-1)
    probs = jax.nn.softmax(logits_f32, axis=-1)
    return log_norm - jnp.sum(probs * logits_f32, axis=-1)


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
