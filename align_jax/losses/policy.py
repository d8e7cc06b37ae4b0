"""Policy-gradient losses for PPO, GRPO and its variants, and the PPO value loss.

`policy_loss` returns a per-token loss [B, T]; `aggregate_loss` reduces it to (numerator,
denominator), which is where GRPO, DAPO, Dr. GRPO and BNPO differ. Summing numerators and
denominators over micro-batches before dividing gives the same loss as one large batch (for every
mode but BNPO's).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from align_jax import ops

Array = jax.Array

POLICY_LOSSES = ("clip", "cispo")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sequence_mean", "token_mean", "token_sum_over_max_len", "batch_token_mean")


def _log_importance_ratio(logps_BxT, old_logps_BxT, mask_BxT, ratio_level):
    # Zeroed on padding so that garbage log-probs there cannot overflow exp (or its gradient).
    log_ratio_BxT = jnp.where(mask_BxT, logps_BxT - old_logps_BxT, 0.0)
    if ratio_level == "token":
        return log_ratio_BxT
    if ratio_level == "sequence":  # GSPO (Zheng et al. 2025, eq. 7): geometric-mean token ratio
        return ops.masked_mean(log_ratio_BxT, mask_BxT, axis=1)[:, None]
    raise ValueError(f"Unknown ratio_level {ratio_level!r}; expected one of {RATIO_LEVELS}")


def policy_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages: Array,
    mask_BxT: Array,
    *,
    loss_type: str = "clip",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ratio_level: str = "token",
    dual_clip: float | None = None,
    cispo_max_ratio: float = 5.0,
    ref_logps_BxT: Array | None = None,
    beta: float = 0.0,
    entropy_BxT: Array | None = None,
    entropy_coef: float = 0.0,
    is_weights_BxT: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-token policy loss: surrogate + β·KL_k3(π‖π_ref) - entropy_coef·H.

    clip (PPO, Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3):
      -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A), with ρ = π/π_old per token, or per sequence
      ρ = exp(mean_t log π/π_old) when ratio_level="sequence" (GSPO). ε_high > ε_low is DAPO's
      clip-higher (Yu et al. 2025, eq. 10). dual_clip=c > 1 bounds the loss of negative-advantage
      tokens by -c·A (Ye et al. 2020, eq. 5).
    cispo (MiniMax-M1, 2025, eq. 4): -sg(min(ρ, cispo_max_ratio)) A log π: the importance
      weight is clipped and detached, so every token keeps a gradient.

    Args:
      logps_BxT: log π of the sampled tokens (the only argument that carries gradient).
      old_logps_BxT: log π_old of the sampler / previous policy.
      advantages: [B] (one per sequence, as GRPO) or [B, T] (per token, as PPO with GAE).
      mask_BxT: 1 on completion tokens.
      ref_logps_BxT, beta: the reference and coefficient of the k3 KL penalty (skipped at β = 0).
      entropy_BxT, entropy_coef: per-token entropy for an entropy bonus and its metric.
      is_weights_BxT: importance weights of the behaviour policy that sampled the tokens when it
        is not π_old (truncated IS, as TRL's vllm_importance_sampling_correction): they multiply
        the surrogate, not the KL or entropy terms.
    Returns:
      per-token loss [B, T] (0 on masked tokens) and metrics, masked token means:
      clip_ratio/{low,high,region}_mean (or cispo_clip_ratio), approx_kl (½(log ρ)², between the
      policy and π_old), kl (when a reference is given), entropy (when given).
    """
    chex.assert_rank([logps_BxT, old_logps_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logps_BxT, old_logps_BxT, mask_BxT])
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"Unknown policy loss_type {loss_type!r}; expected one of {POLICY_LOSSES}")
    if advantages.ndim == 1:
        chex.assert_shape(advantages, (logps_BxT.shape[0],))
        advantages = advantages[:, None]
    else:
        chex.assert_equal_shape([advantages, logps_BxT])
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask_BxT = mask_BxT.astype(bool)
    old_logps_BxT = jax.lax.stop_gradient(old_logps_BxT)
    advantages = jax.lax.stop_gradient(advantages).astype(jnp.float32)

    log_ratio = _log_importance_ratio(logps_BxT, old_logps_BxT, mask_BxT, ratio_level)
    ratio = jnp.exp(jnp.broadcast_to(log_ratio, logps_BxT.shape))
    metrics = {}
    if loss_type == "clip":
        clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        objective = jnp.minimum(ratio * advantages, clipped_ratio * advantages)
        if dual_clip is not None:
            if dual_clip <= 1.0:
                raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
            objective = jnp.where(
                advantages < 0, jnp.maximum(objective, dual_clip * advantages), objective
            )
        per_token = -objective
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = ops.masked_mean(low.astype(jnp.float32), mask_BxT)
        metrics["clip_ratio/high_mean"] = ops.masked_mean(high.astype(jnp.float32), mask_BxT)
        metrics["clip_ratio/region_mean"] = ops.masked_mean((low | high).astype(jnp.float32),
                                                            mask_BxT)
    else:
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, cispo_max_ratio))
        per_token = -weight * advantages * logps_BxT
        clipped = (ratio > cispo_max_ratio) & (advantages > 0)
        metrics["cispo_clip_ratio"] = ops.masked_mean(clipped.astype(jnp.float32), mask_BxT)

    if is_weights_BxT is not None:
        chex.assert_equal_shape([is_weights_BxT, logps_BxT])
        per_token = per_token * jax.lax.stop_gradient(is_weights_BxT)
    metrics["approx_kl"] = ops.masked_mean(
        jax.lax.stop_gradient(ops.kl_k2(logps_BxT, old_logps_BxT)), mask_BxT
    )
    if ref_logps_BxT is not None and (not isinstance(beta, (int, float)) or beta != 0.0):
        chex.assert_equal_shape([ref_logps_BxT, logps_BxT])
        kl_BxT = ops.kl_k3(logps_BxT, jax.lax.stop_gradient(ref_logps_BxT))
        per_token = per_token + beta * kl_BxT
        metrics["kl"] = ops.masked_mean(jax.lax.stop_gradient(kl_BxT), mask_BxT)
    if entropy_BxT is not None:
        chex.assert_equal_shape([entropy_BxT, logps_BxT])
        per_token = per_token - entropy_coef * entropy_BxT
        metrics["entropy"] = ops.masked_mean(jax.lax.stop_gradient(entropy_BxT), mask_BxT)
    return jnp.where(mask_BxT, per_token, 0.0), metrics


def truncated_importance_weights(old_logps_BxT: Array, sampler_logps_BxT: Array, mask_BxT: Array,
                                 cap: float) -> Array:
    """w_t = min(π_old(y_t) / π_sampler(y_t), cap) per token, 1 where masked: the truncated
    importance weights that correct for a behaviour policy other than π_old (an asynchronous or
    differently computed sampler; Yao et al. 2025, as TRL's token_truncate)."""
    chex.assert_equal_shape([old_logps_BxT, sampler_logps_BxT, mask_BxT])
    diff_BxT = jnp.where(mask_BxT, old_logps_BxT - sampler_logps_BxT, 0.0)
    return jnp.minimum(jnp.exp(diff_BxT), cap)


def aggregate_loss(
    per_token_loss_BxT: Array, mask_BxT: Array, mode: str, *, max_length: int | None = None
) -> tuple[Array, Array]:
    """Reduce a per-token loss to (numerator, denominator); the loss is numerator / denominator.

    sequence_mean (GRPO; TRL "grpo"): Σ_b (Σ_t ℓ_bt / |o_b|), over B.
    token_mean (DAPO, Yu et al. 2025, eq. 8; TRL "dapo"): Σ_bt ℓ_bt over Σ_b |o_b|; accumulated
      over micro-batches it is the token mean of the whole batch.
    token_sum_over_max_len (Dr. GRPO, Liu et al. 2025; TRL "dr_grpo"): Σ_bt ℓ_bt / T_max, over B,
      with T_max = max_length (default: the padded length T), a constant that adds no length bias.
    batch_token_mean (BNPO; TRL "bnpo"): the token mean within this batch, over 1; micro-batches
      would each divide by their own token count (`train.methods.check_micro_batches` refuses it).
    """
    chex.assert_rank([per_token_loss_BxT, mask_BxT], 2)
    chex.assert_equal_shape([per_token_loss_BxT, mask_BxT])
    valid = mask_BxT.astype(bool)
    num_sequences = jnp.asarray(per_token_loss_BxT.shape[0], jnp.float32)
    if mode == "sequence_mean":
        return jnp.sum(ops.masked_mean(per_token_loss_BxT, valid, axis=1)), num_sequences
    total = ops.masked_sum(per_token_loss_BxT, valid)
    num_tokens = jnp.sum(valid, dtype=jnp.float32)
    if mode == "token_mean":
        return total, num_tokens
    if mode == "token_sum_over_max_len":
        max_length = per_token_loss_BxT.shape[1] if max_length is None else max_length
        return total / max_length, num_sequences
    if mode == "batch_token_mean":
        return total / jnp.maximum(num_tokens, 1.0), jnp.ones((), jnp.float32)
    raise ValueError(f"Unknown aggregation mode {mode!r}; expected one of {AGGREGATIONS}")


def value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    *,
    clip_range: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss of PPO: ½ max((V - R)², (clip(V, V_old ± ε) - R)²) per token.

    As in OpenAI's baselines and TRL's PPOTrainer. Returns per-token loss [B, T] (0 on masked
    tokens) and metrics vf_clipfrac (fraction of tokens where the clipped term is larger) and
    vpred (mean predicted value).
    """
    chex.assert_rank([values_BxT, old_values_BxT, returns_BxT, mask_BxT], 2)
    chex.assert_equal_shape([values_BxT, old_values_BxT, returns_BxT, mask_BxT])
    mask_BxT = mask_BxT.astype(bool)
    old_values_BxT = jax.lax.stop_gradient(old_values_BxT)
    returns_BxT = jax.lax.stop_gradient(returns_BxT)
    clipped_BxT = jnp.clip(values_BxT, old_values_BxT - clip_range, old_values_BxT + clip_range)
    unclipped_err = jnp.square(values_BxT - returns_BxT)
    clipped_err = jnp.square(clipped_BxT - returns_BxT)
    per_token = 0.5 * jnp.maximum(unclipped_err, clipped_err)
    metrics = {
        "vf_clipfrac": ops.masked_mean((clipped_err > unclipped_err).astype(jnp.float32), mask_BxT),
        "vpred": ops.masked_mean(jax.lax.stop_gradient(values_BxT), mask_BxT),
    }
    return jnp.where(mask_BxT, per_token, 0.0), metrics
