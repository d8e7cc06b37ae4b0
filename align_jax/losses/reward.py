"""Bradley-Terry reward-model loss."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def bradley_terry_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    margin: Array | None = None,
    center_coef: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """-log σ(r_w - r_l - m) + c (r_w + r_l)², per pair.

    The Bradley-Terry likelihood of the preference (Ouyang et al. 2022, eq. 1); m is an optional
    per-pair margin (Llama 2, Touvron et al. 2023, eq. 2) and c the reward-centering coefficient
    (Eisenstein et al. 2023), which pulls the rewards of a pair towards zero mean.

    Args:
      chosen_rewards, rejected_rewards: [B] scalar rewards r_w, r_l.
      margin: optional [B] margin m.
      center_coef: c ≥ 0.
    Returns:
      losses [B] and metrics accuracy (r_w > r_l) and margin (r_w - r_l), means over the batch.
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        chex.assert_equal_shape([margin, chosen_rewards])
        diff = diff - margin
    losses = -jax.nn.log_sigmoid(diff)
    if center_coef:
        losses = losses + center_coef * jnp.square(chosen_rewards + rejected_rewards)
    reward_gap = jax.lax.stop_gradient(chosen_rewards - rejected_rewards)
    metrics = {
        "accuracy": jnp.mean((reward_gap > 0).astype(jnp.float32)),
        "margin": jnp.mean(reward_gap),
    }
    return losses, metrics
