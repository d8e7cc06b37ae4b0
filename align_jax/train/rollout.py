"""The two jitted programs of one online rollout, between which the host only decodes text and
scores it.

`prepare_rollout(params, frozen, reward_params, sampled, kl_coef)`: from what the sampler and
the reward functions produced (`Sampled`), the loss mask, the reference log-probs, the reward
model's scores, the critic's values and the method's targets (`OnlineMethod.targets`: group
advantages, or PPO's KL-penalised rewards and GAE), all on the devices.

`update_rollout(state, frozen, rollout, key)`: `rl.num_iterations` passes over the rollout, each
in `rl.mini_batches` mini-batches of rows drawn by an on-device permutation (`minibatch_rows`),
one train step each, scanned; the metrics of every update come back stacked, once per rollout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from align_jax import losses, ops
from align_jax.config import RLConfig, RunConfig, SweepConfig
from align_jax.train.mesh import batch_sharding, replicated
from align_jax.train.models import Frozen, Models
from align_jax.train.online import (
    OnlineMethod,
    Rollout,
    critic_values,
    policy_outputs,
    prompt_group,
)
from align_jax.train.state import TrainState, learning_rate, make_optimizer
from align_jax.train.sweep import vmap_members

Array = jax.Array


class Sampled(NamedTuple):
    """A rollout as the host assembles it: B = N·G rows, a prompt's G samples contiguous."""

    prompt_ids_BxP: Array  # left-padded
    prompt_mask_BxP: Array
    completion_ids_BxC: Array  # right-padded
    completion_mask_BxC: Array  # every token after the prompt (an environment's too), unpadded
    model_mask_BxC: Array  # the policy's tokens up to and including each turn's stop token
    logps_BxC: Array  # the sampler's log-probs of its tokens; 0 elsewhere
    truncated_B: Array  # no stop token within rl.max_new_tokens
    rewards_B: Array  # the weighted reward functions; NaN where none scored the sample


def rollout_optimizer(cfg: RunConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW, its schedule) counted in updates: `train.steps` and `train.warmup_steps` count
    rollouts of `rl.num_iterations` × `rl.mini_batches` updates each."""
    t, updates = cfg.train, cfg.rl.num_iterations * cfg.rl.mini_batches
    in_updates = dataclasses.replace(t, steps=t.steps * updates,
                                     warmup_steps=t.warmup_steps * updates)
    return make_optimizer(in_updates), learning_rate(in_updates)


def prepare_rollout(method: OnlineMethod, models: Models, cfg: RLConfig, params: nnx.State,
                    frozen: Frozen, reward_model, s: Sampled, kl_coef: Array
                    ) -> tuple[Rollout, dict[str, Array]]:
    """The rollout the updates train on, and the method's per-rollout metrics.

    loss mask = model mask (the policy's tokens) ∧ scored (a reward function applied, unless a
    reward model scores) ∧ ¬truncated (with `rl.mask_truncated`); scores = the reward model's at
    the last token (`reward_model`, a Decoder with a scalar head, or None) or the reward
    functions';
    reference log-probs when the method holds a reference; critic values when it has a critic
    (these passes run each group's prompt once where `prompt_group` says it pays);
    with `rl.importance_sampling_cap`, the trainer's own log-probs as π_old and truncated
    importance weights (`truncated_importance`).
    """
    valid_B = jnp.isfinite(s.rewards_B) if reward_model is None else jnp.ones_like(s.truncated_B)
    loss_mask = s.model_mask_BxC & valid_B[:, None]
    if cfg.mask_truncated:
        loss_mask &= ~s.truncated_B[:, None]
    r = Rollout(s.prompt_ids_BxP, s.prompt_mask_BxP, s.completion_ids_BxC, s.completion_mask_BxC,
                loss_mask, s.logps_BxC, jnp.zeros(s.truncated_B.shape, jnp.float32))
    reference = models.reference(frozen)
    if reference is not None:
        r = r._replace(ref_logps_BxC=policy_outputs(
            reference, r, cfg.temperature, prompt_group(reference.config, r, cfg))[0])
    if reward_model is None:
        scores_B = jnp.nan_to_num(s.rewards_B).astype(jnp.float32)
    else:
        ids = jnp.concatenate([s.prompt_ids_BxP, s.completion_ids_BxC], axis=1)
        mask = jnp.concatenate([s.prompt_mask_BxP, s.completion_mask_BxC], axis=1)
        scores_B = reward_model.score(ids, mask).astype(jnp.float32)
    model = models.model(params, frozen)
    values = (critic_values(model.value, r, prompt_group(model.value.config, r, cfg))
              if method.critic else None)
    r, metrics = method.targets(r, scores_B, valid_B, s.truncated_B, values, kl_coef, cfg)
    if cfg.importance_sampling_cap is None:
        return r, metrics
    return truncated_importance(r, model.policy if method.critic else model, cfg, metrics)


def truncated_importance(r: Rollout, policy, cfg: RLConfig, metrics: dict
                         ) -> tuple[Rollout, dict[str, Array]]:
    """The ratio taken to the trainer's log-probs π_old at the start of the rollout's updates,
    and each token weighted by min(π_old / π_sampler, `importance_sampling_cap`), with TRL's
    metrics of the weights and the sampler-vs-trainer gap, measured here (the updates' ratio
    starts at 1)."""
    old_logps = policy_outputs(policy, r, cfg.temperature, prompt_group(policy.config, r, cfg))[0]
    weights = losses.truncated_importance_weights(old_logps, r.old_logps_BxC, r.loss_mask_BxC,
                                                  cfg.importance_sampling_cap)
    mask = r.loss_mask_BxC.astype(bool)
    metrics = dict(metrics, **{
        "sampling/sampler_trainer_logp_diff": ops.masked_mean(
            jnp.abs(old_logps - r.old_logps_BxC), mask),
        "sampling/importance_sampling_ratio/min": jnp.min(jnp.where(mask, weights, jnp.inf)),
        "sampling/importance_sampling_ratio/mean": ops.masked_mean(weights, mask),
        "sampling/importance_sampling_ratio/max": jnp.max(jnp.where(mask, weights, -jnp.inf))})
    return r._replace(old_logps_BxC=old_logps, is_weights_BxC=weights), metrics


def jit_prepare_rollout(method: OnlineMethod, models: Models, cfg: RLConfig, mesh: Mesh,
                        param_shardings, frozen_shardings: Frozen, reward_graphdef=None,
                        sweep: SweepConfig | None = None):
    """`prepare_rollout` jitted: (params, frozen, reward_params or None, sampled, kl_coef) ->
    (rollout, metrics), the rows split over the batch axes; with a sweep, over the members'
    stacked params (`param_shardings` stacked), rollouts and KL coefficients."""
    def make(rl: RLConfig):
        def prepare(params, frozen, reward_params, sampled, kl_coef):
            reward_model = (None if reward_graphdef is None
                            else nnx.merge(reward_graphdef, reward_params))
            return prepare_rollout(method, models, rl, params, frozen, reward_model, sampled,
                                   kl_coef)
        return prepare

    stacked = sweep is not None and sweep.field is not None
    prepare = (vmap_members(make, cfg, sweep.field, sweep.values, (0, None, None, 0, 0))
               if stacked else make(cfg))
    rows = batch_sharding(mesh, stacked)
    return jax.jit(prepare, in_shardings=(param_shardings, frozen_shardings, None, rows,
                                          replicated(mesh)),
                   out_shardings=(rows, replicated(mesh)))


def minibatch_rows(key: Array, rows: int, passes: int, mini_batches: int, group: int = 1
                   ) -> Array:
    """[passes · mini_batches, rows / mini_batches] row indices: each pass a fresh permutation of
    the rows, or of whole groups of `group` contiguous rows, cut into mini-batches, each sorted."""
    keys = jax.random.split(key, passes)
    order = jax.vmap(lambda k: jax.random.permutation(k, rows // group))(keys)
    order = (order[..., None] * group + jnp.arange(group)).reshape(passes, rows)
    return jnp.sort(order.reshape(passes * mini_batches, rows // mini_batches), axis=-1)


def minibatch_group(cfg: RLConfig, rows: int) -> int:
    """The rows `minibatch_rows` keeps together: a prompt's G samples under `rl.share_prompt`
    when a mini-batch holds whole groups (so its groups can run packed, `online.prompt_group`),
    else 1."""
    G = cfg.num_generations
    return G if cfg.share_prompt and (rows // cfg.mini_batches) % G == 0 else 1


def make_update_rollout(step: Callable, cfg: RLConfig, mesh: Mesh) -> Callable:
    """(state, frozen, rollout, key) -> (state, metrics stacked over the updates): the train step
    `step` on each mini-batch of `minibatch_rows(key, …)` in turn, in one `lax.scan`."""
    def update(state: TrainState, frozen: Frozen, rollout: Rollout, key: Array):
        B = rollout.prompt_ids_BxP.shape[0]
        index = minibatch_rows(key, B, cfg.num_iterations, cfg.mini_batches,
                               minibatch_group(cfg, B))

        def one(state, rows):
            mini = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), rollout)
            return step(state, frozen, jax.lax.with_sharding_constraint(mini,
                                                                        batch_sharding(mesh)))

        return jax.lax.scan(one, state, index)

    return update


def jit_update_rollout(make_step: Callable[[RLConfig], Callable], cfg: RLConfig, mesh: Mesh,
                       shardings: TrainState, frozen_shardings: Frozen,
                       sweep: SweepConfig | None = None):
    """`make_update_rollout(make_step(cfg), …)` jitted with the state's shardings in and out (its
    buffers donated) and the rollout's rows split over the batch axes; with a sweep, over the
    members' stacked states (`shardings` stacked), rollouts and keys."""
    def make(rl: RLConfig):
        return make_update_rollout(make_step(rl), rl, mesh)

    stacked = sweep is not None and sweep.field is not None
    update = (vmap_members(make, cfg, sweep.field, sweep.values, (0, None, 0, 0)) if stacked
              else make(cfg))
    return jax.jit(update, in_shardings=(shardings, frozen_shardings,
                                         batch_sharding(mesh, stacked), replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
