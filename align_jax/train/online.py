"""Online RL on one rollout: what it carries, the models' per-token outputs on it, PPO's reward
shaping and KL controller, and the GRPO and PPO losses on one micro-batch.

A rollout holds B = N·G sampled completions (the G samples of a prompt contiguous): left-padded
prompts [B, P] followed by right-padded completions [B, C]. The policy's log-probs at the C
completion slots come from the hidden states at positions P-1 … P+C-2, with logits divided by
the sampling temperature, exactly as the sampler computed them. The losses have the signature of
`methods.py`, `(model, ref_model, batch, cfg) -> (numerator, denominator, metrics)`, so the
same micro-batched, sharded train step runs them. `ONLINE_METHODS` names each algorithm's loss,
advantage targets and models (`OnlineMethod`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax import losses, ops
from align_jax.config import RLConfig
from align_jax.models import Decoder

Array = jax.Array


class Rollout(NamedTuple):
    prompt_ids_BxP: Array
    prompt_mask_BxP: Array
    completion_ids_BxC: Array
    completion_mask_BxC: Array  # every token after the prompt (an environment's too), unpadded
    # the policy's tokens of the samples that train (a reward, not truncated when masked)
    loss_mask_BxC: Array
    old_logps_BxC: Array  # the sampling policy's log-probs of the sampled tokens
    advantages: Array  # [B] (GRPO family) or [B, C] (PPO)
    ref_logps_BxC: Array | None = None  # reference log-probs (GRPO with β > 0)
    old_values_BxC: Array | None = None  # PPO: the critic at sampling time
    returns_BxC: Array | None = None  # PPO: GAE returns, the critic's targets
    is_weights_BxC: Array | None = None  # truncated importance weights π_old / π_sampler


class ActorCritic(nnx.Module):
    """PPO's trainable pair: the policy and a separate critic (a decoder with a scalar head), one
    parameter tree under one optimizer, as TRL's PolicyAndValueWrapper."""

    def __init__(self, policy: Decoder, value: Decoder):
        self.policy, self.value = policy, value


def actor_critic(make_policy, make_value):
    """rngs -> ActorCritic(make_policy(rngs), make_value(rngs))."""
    return lambda rngs: ActorCritic(make_policy(rngs), make_value(rngs))


def _sequence(r: Rollout) -> tuple[Array, Array]:
    ids = jnp.concatenate([r.prompt_ids_BxP, r.completion_ids_BxC], axis=1)
    mask = jnp.concatenate([r.prompt_mask_BxP, r.completion_mask_BxC], axis=1).astype(bool)
    return ids, mask


def _packed_hidden(model: Decoder, r: Rollout, G: int) -> Array:
    """`completion_hidden` over N = B/G rows prompt | completion 1 | … | completion G, segment ids
    0, 1, …, G: completion g attends to the prompt and to itself only, at the positions it has in
    a row of its own, and its first token is predicted from the prompt's last slot."""
    B, P = r.prompt_ids_BxP.shape
    C, N = r.completion_ids_BxC.shape[1], B // G
    ids = jnp.concatenate([r.prompt_ids_BxP[::G], r.completion_ids_BxC.reshape(N, G * C)], axis=1)
    mask = jnp.concatenate([r.prompt_mask_BxP[::G], r.completion_mask_BxC.reshape(N, G * C)],
                           axis=1).astype(bool)
    segments = jnp.concatenate([jnp.zeros(P, jnp.int32), jnp.repeat(jnp.arange(1, G + 1), C)])
    hidden_NxTxD, _ = model.hidden_states(ids, mask,
                                          segment_ids_BxT=jnp.broadcast_to(segments, ids.shape))
    D = hidden_NxTxD.shape[-1]
    last_prompt = jnp.broadcast_to(hidden_NxTxD[:, None, P - 1:P], (N, G, 1, D))
    own = hidden_NxTxD[:, P:].reshape(N, G, C, D)[:, :, :-1]
    return jnp.concatenate([last_prompt, own], axis=2).reshape(B, C, D)


def completion_hidden(model: Decoder, r: Rollout, group: int = 1) -> Array:
    """Hidden states [B, C, D] at the positions that predict each completion token. With
    `group` = G > 1 the rows are whole groups of G samples of one prompt, and each group runs as
    one packed row, the prompt once (`_packed_hidden`; `prompt_group` says when that pays)."""
    if group > 1:
        return _packed_hidden(model, r, group)
    ids, mask = _sequence(r)
    hidden, _ = model.hidden_states(ids, mask)
    P = r.prompt_ids_BxP.shape[1]
    return hidden[:, P - 1:-1]


def _row_flops(config, tokens: int) -> int:
    """Forward matmul FLOPs of the blocks on one row of `tokens` tokens, attention scores and
    values over all tokens² query-key pairs (as the einsum path computes them, masked or not)."""
    c = config
    width = (c.moe_intermediate_size * c.num_experts_per_tok if c.num_experts
             else c.intermediate_size)
    per_token = c.hidden_size * (c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * width)
    return c.num_layers * (2 * per_token * tokens + 4 * c.num_heads * c.head_dim * tokens ** 2)


def prompt_group(config, r: Rollout, cfg: RLConfig) -> int:
    """G = rl.num_generations when the rollout's rows run as packed groups (`completion_hidden`):
    `rl.share_prompt` is set, the rows are whole groups of G (in order: a rollout's are, and so are
    the mini-batches `rollout.minibatch_rows` draws under `rl.share_prompt`), and one row
    prompt | G completions costs fewer FLOPs than G rows prompt | completion (`_row_flops`; the
    quadratic attention term grows with G·C). Else 1."""
    G = cfg.num_generations
    (B, P), C = r.prompt_ids_BxP.shape, r.completion_ids_BxC.shape[1]
    if not (cfg.share_prompt and G > 1 and B % G == 0):
        return 1
    return G if _row_flops(config, P + G * C) < G * _row_flops(config, P + C) else 1


def policy_outputs(model: Decoder, r: Rollout, temperature: float, group: int = 1
                   ) -> tuple[Array, Array]:
    """log π(y_t | …) of log softmax(logits / temperature) and the entropy of that distribution,
    both [B, C] float32 (the LM head chunked by `model.logits_chunk`; `group` as
    `completion_hidden`)."""
    stats = ops.head_token_stats(model.logits, completion_hidden(model, r, group),
                                 r.completion_ids_BxC, chunk=model.logits_chunk,
                                 temperature=temperature, entropy=True)
    return stats["logps"], stats["entropy"]


def critic_values(critic: Decoder, r: Rollout, group: int = 1) -> Array:
    """V(s_t) [B, C]: the critic's scalar head on the state before each completion token."""
    return critic.score_head(completion_hidden(critic, r, group))[..., 0].astype(jnp.float32)


def grpo(model, ref_model, r: Rollout, cfg: RLConfig):
    """The GRPO family's loss: `losses.policy_loss` (clipped token or sequence ratio, k3 KL with
    β, entropy bonus) reduced by `losses.aggregate_loss` (GRPO, DAPO or Dr. GRPO, whose constant
    is the most tokens the policy can write in a sample: `rl.max_turns` × `rl.max_new_tokens`)."""
    group = prompt_group(model.config, r, cfg)
    logps, entropy = policy_outputs(model, r, cfg.temperature, group)
    per_token, metrics = losses.policy_loss(
        logps, r.old_logps_BxC, r.advantages, r.loss_mask_BxC, loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
        ratio_level=cfg.importance_sampling_level, ref_logps_BxT=r.ref_logps_BxC, beta=cfg.beta,
        entropy_BxT=entropy, entropy_coef=cfg.entropy_coef, is_weights_BxT=r.is_weights_BxC)
    num, den = losses.aggregate_loss(per_token, r.loss_mask_BxC, cfg.aggregation,
                                     max_length=cfg.max_turns * cfg.max_new_tokens)
    metrics["logp_diff"] = ops.masked_mean(jnp.abs(jax.lax.stop_gradient(logps) - r.old_logps_BxC),
                                           r.loss_mask_BxC)
    return num, den, metrics


def ppo(model: ActorCritic, ref_model, r: Rollout, cfg: RLConfig):
    """PPO's loss, token means over the batch: clipped surrogate + vf_coef · clipped value loss
    (Schulman et al. 2017; as TRL's PPOTrainer)."""
    group = prompt_group(model.policy.config, r, cfg)
    logps, entropy = policy_outputs(model.policy, r, cfg.temperature, group)
    pg_BxC, metrics = losses.policy_loss(
        logps, r.old_logps_BxC, r.advantages, r.loss_mask_BxC, epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high, entropy_BxT=entropy, entropy_coef=cfg.entropy_coef,
        is_weights_BxT=r.is_weights_BxC)
    vf_BxC, value_metrics = losses.value_loss(critic_values(model.value, r, group),
                                              r.old_values_BxC, r.returns_BxC, r.loss_mask_BxC,
                                              clip_range=cfg.cliprange_value)
    num, den = losses.aggregate_loss(pg_BxC + cfg.vf_coef * vf_BxC, r.loss_mask_BxC, "token_mean")
    mask = r.loss_mask_BxC
    metrics.update(value_metrics,
                   **{"loss/policy": ops.masked_mean(jax.lax.stop_gradient(pg_BxC), mask),
                      "loss/value": ops.masked_mean(jax.lax.stop_gradient(vf_BxC), mask),
                      "logp_diff": ops.masked_mean(jnp.abs(jax.lax.stop_gradient(logps)
                                                           - r.old_logps_BxC), mask)})
    return num, den, metrics


def group_targets(r: Rollout, scores_B: Array, valid_B: Array, truncated_B: Array,
                  values_BxC: Array | None, kl_coef: Array, cfg: RLConfig
                  ) -> tuple[Rollout, dict[str, Array]]:
    """The GRPO family's advantages: each sample's reward against its group of G,
    (r - mean) / std (GRPO; `scale_rewards` none: Dr. GRPO) or r - mean of the others (RLOO);
    samples no reward function scored (`valid_B` false) take no part."""
    G = cfg.num_generations
    advantages, group = losses.group_advantages(scores_B, G, scale=cfg.scale_rewards,
                                                valid_B=valid_B)
    if cfg.advantage == "rloo":
        advantages = losses.rloo_advantages(scores_B, G, valid_B=valid_B)
    return r._replace(advantages=advantages), group


def ppo_targets(r: Rollout, scores_B: Array, valid_B: Array, truncated_B: Array,
                values_BxC: Array, kl_coef: Array, cfg: RLConfig
                ) -> tuple[Rollout, dict[str, Array]]:
    """PPO's per-token rewards, GAE advantages and value targets for a rollout.

    r_t = -kl_coef · (log π_old(y_t) - log π_ref(y_t)), plus the reward model's score at the last
    token (minus `missing_eos_penalty` when the completion has no EOS: the EOS trick), optionally
    whitened without shifting the mean; Â, R = GAE(γ, λ) on the critic's values; Â whitened.
    The reference log-probs are used up here: the returned rollout no longer carries them.
    """
    mask = r.loss_mask_BxC.astype(bool)
    if cfg.missing_eos_penalty is not None:
        scores_B = scores_B - cfg.missing_eos_penalty * truncated_B.astype(jnp.float32)
    kl_BxC = jnp.where(mask, r.old_logps_BxC - r.ref_logps_BxC, 0.0)
    non_score_BxC = -kl_coef * kl_BxC
    last = jnp.sum(r.completion_mask_BxC, axis=1) - 1
    at_last_BxC = jnp.arange(mask.shape[1])[None, :] == last[:, None]
    rewards_BxC = non_score_BxC + jnp.where(at_last_BxC & mask, scores_B[:, None], 0.0)
    if cfg.whiten_rewards:
        rewards_BxC = ops.masked_whiten(rewards_BxC, mask, shift_mean=False)
    advantages_BxC, returns_BxC = losses.gae(rewards_BxC, values_BxC, mask, gamma=cfg.gamma,
                                             lam=cfg.lam)
    advantages_BxC = ops.masked_whiten(advantages_BxC, mask)
    kl_B = jnp.sum(kl_BxC, axis=1)
    metrics = {"objective/kl": jnp.mean(kl_B), "objective/scores": jnp.mean(scores_B),
               "objective/non_score_reward": jnp.mean(jnp.sum(non_score_BxC, axis=1)),
               "objective/rlhf_reward": jnp.mean(scores_B - kl_coef * kl_B),
               "val/num_eos_tokens": jnp.sum(~truncated_B).astype(jnp.float32)}
    return r._replace(advantages=advantages_BxC, ref_logps_BxC=None,
                      old_values_BxC=values_BxC * mask, returns_BxC=returns_BxC), metrics


def adaptive_kl_coef(kl_coef: float, kl: float, *, target: float, horizon: int,
                     n_steps: int) -> float:
    """Ziegler et al. (2019), §2.2:
    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon), where n_steps is the
    number of samples in the rollout."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class OnlineMethod(NamedTuple):
    """An online algorithm, all that sets it apart from the others.

    loss: (model, ref_model, rollout, cfg) -> (numerator, denominator, metrics), the micro-batch
      loss the train step differentiates;
    targets: (rollout, scores_B, valid_B, truncated_B, values_BxC, kl_coef, cfg) -> (rollout with
      its advantages, metrics), run once per rollout;
    critic: whether it trains a value model beside the policy (an `ActorCritic`);
    reference: whether a run with this RLConfig holds a frozen reference policy;
    sweepable: what a sweep's members may differ in: `seed` and the RLConfig floats its loss and
      targets use arithmetically (`train.sweep`).
    """

    loss: Callable
    targets: Callable
    critic: bool
    reference: Callable[[RLConfig], bool]
    sweepable: tuple[str, ...]


_POLICY_FLOATS = ("epsilon_low", "epsilon_high", "entropy_coef")
ONLINE_METHODS: dict[str, OnlineMethod] = {
    "grpo": OnlineMethod(grpo, group_targets, critic=False, reference=lambda cfg: cfg.beta != 0.0,
                         sweepable=("seed", "beta", *_POLICY_FLOATS)),
    "ppo": OnlineMethod(ppo, ppo_targets, critic=True, reference=lambda cfg: True,
                        sweepable=("seed", *_POLICY_FLOATS, "kl_coef", "vf_coef",
                                   "cliprange_value", "gamma", "lam")),
}
