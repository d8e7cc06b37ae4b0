"""Advantage estimators: group-relative (GRPO, Dr. GRPO), leave-one-out (RLOO), and GAE (PPO).

Group layouts follow TRL: the G samples of each of N prompts are contiguous, so rewards of shape
[B] = [N·G] reshape to [N, G].
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from align_jax import ops

Array = jax.Array

SCALES = ("group", "batch", "none")


def _as_groups(rewards_B: Array, group_size: int) -> Array:
    chex.assert_rank(rewards_B, 1)
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(
            f"{rewards_B.shape[0]} rewards do not split into groups of size {group_size}"
        )
    return rewards_B.reshape(-1, group_size).astype(jnp.float32)


def _valid_groups(rewards_B: Array, group_size: int, valid_B: Array | None) -> tuple[Array, Array]:
    rewards_NxG = _as_groups(rewards_B, group_size)
    if valid_B is None:
        return rewards_NxG, jnp.ones_like(rewards_NxG, bool)
    chex.assert_equal_shape([rewards_B, valid_B])
    valid_NxG = valid_B.reshape(rewards_NxG.shape).astype(bool)
    return jnp.where(valid_NxG, rewards_NxG, 0.0), valid_NxG


def group_advantages(
    rewards_B: Array, group_size: int, *, scale: str = "group", eps: float = 1e-4,
    valid_B: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """A_i = (r_i - mean(r_group)) / (std + eps) (GRPO, Shao et al. 2024, §4.1.2).

    scale="group": std over the sample's own group (GRPO); "batch": std over all rewards in the
    batch (TRL's scale_rewards="batch"); "none": no scaling (Dr. GRPO, Liu et al. 2025, eq. 3).
    std is the unbiased (n-1) standard deviation, as `torch.std` in TRL. With `valid_B`, samples
    marked False (no reward) are left out of every mean and std and get advantage 0.

    Returns:
      advantages [N·G] and metrics reward_std (mean within-group std) and frac_reward_zero_std
      (fraction of groups whose rewards are all equal, which carry no learning signal).
    """
    if scale not in SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; expected one of {SCALES}")
    rewards_NxG, valid_NxG = _valid_groups(rewards_B, group_size, valid_B)
    centred_NxG = rewards_NxG - ops.masked_mean(rewards_NxG, valid_NxG, axis=1)[:, None]
    group_std_N = jnp.sqrt(ops.masked_var(rewards_NxG, valid_NxG, axis=1))
    if scale == "group":
        centred_NxG = centred_NxG / (group_std_N[:, None] + eps)
    elif scale == "batch":
        centred_NxG = centred_NxG / (jnp.sqrt(ops.masked_var(rewards_NxG, valid_NxG)) + eps)
    metrics = {
        "reward_std": jnp.mean(group_std_N),
        "frac_reward_zero_std": jnp.mean(jnp.isclose(group_std_N, 0.0).astype(jnp.float32)),
    }
    return jnp.where(valid_NxG, centred_NxG, 0.0).reshape(-1), metrics


def rloo_advantages(rewards_B: Array, group_size: int, *, valid_B: Array | None = None) -> Array:
    """A_i = r_i - 1/(G-1) Σ_{j≠i} r_j, the leave-one-out baseline (Ahmadian et al. 2024, eq. 6).

    Equals G/(G-1) · (r_i - mean(r_group)). With `valid_B`, the baseline averages the other valid
    samples, and invalid samples (or a valid one with no valid peer) get advantage 0. Returns [N·G].
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    rewards_NxG, valid_NxG = _valid_groups(rewards_B, group_size, valid_B)
    others_N = jnp.sum(valid_NxG, axis=1, keepdims=True) - valid_NxG
    others_mean_NxG = ((jnp.sum(rewards_NxG, axis=1, keepdims=True) - rewards_NxG)
                       / jnp.maximum(others_N, 1))
    return jnp.where(valid_NxG & (others_N > 0), rewards_NxG - others_mean_NxG, 0.0).reshape(-1)


def _gae_one(rewards_T, values_T, mask_T, gamma, lam):
    """GAE for one trajectory, scanning backwards over time; a masked token passes the next
    valid token's value and advantage through unchanged."""

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = jax.tree.map(lambda new, old: jnp.where(valid, new, old), (value, advantage), carry)
        return carry, advantage * valid

    _, advantages_T = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(())),
                                   (rewards_T, values_T, mask_T), reverse=True)
    return advantages_T


def gae(
    rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Array, Array]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) per token.

    δ_t = r_t + γ V_{t+1} - V_t with V = 0 after the last valid token, Â_t = Σ_k (γλ)^k δ_{t+k}.
    mask_BxT is 1 on the policy's tokens, 0 on padding and on tokens it did not generate (an
    environment's, between the turns of a rollout): t + 1 is the next valid token, so a masked
    stretch is skipped as if the valid tokens were contiguous.

    Returns:
      advantages [B, T] and returns = advantages + values [B, T], both 0 on padding.
    """
    chex.assert_rank([rewards_BxT, values_BxT, mask_BxT], 2)
    chex.assert_equal_shape([rewards_BxT, values_BxT, mask_BxT])
    mask_BxT = mask_BxT.astype(jnp.float32)
    rewards_BxT = rewards_BxT.astype(jnp.float32) * mask_BxT
    values_BxT = values_BxT.astype(jnp.float32) * mask_BxT
    advantages_BxT = jax.vmap(_gae_one, in_axes=(0, 0, 0, None, None))(
        rewards_BxT, values_BxT, mask_BxT, gamma, lam
    )
    return advantages_BxT, (advantages_BxT + values_BxT) * mask_BxT
