"""The two jitted programs of an online rollout: `update_rollout`'s scan equals one train step per
mini-batch of the same on-device permutation, and `prepare_rollout` assembles the loss mask,
reference log-probs, reward-model scores, critic values and targets as their parts compute them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from align_jax.config import RLConfig
from align_jax.models import Decoder, load_pretrained
from align_jax.train import online
from align_jax.train.mesh import make_mesh
from align_jax.train.models import Frozen, Models
from align_jax.train.rollout import (
    Sampled,
    make_update_rollout,
    minibatch_rows,
    prepare_rollout,
)
from align_jax.train.state import init_train_state
from align_jax.train.step import make_train_step
from tests.models.test_hf_parity import tiny_hf_model
from tests.train.test_online import random_rollout


def test_minibatch_rows_cut_a_fresh_permutation_per_pass():
    rows = np.asarray(minibatch_rows(jax.random.key(0), 12, 3, 4))
    assert rows.shape == (12, 3)
    passes = rows.reshape(3, 12)
    for p in passes:
        assert sorted(p.tolist()) == list(range(12))
    assert all((np.diff(r) > 0).all() for r in rows)  # sorted within a mini-batch
    assert len({tuple(p) for p in passes}) == 3


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_update_rollout_is_one_train_step_per_minibatch(micro_batches):
    """μ = 2 passes × 2 mini-batches in one scan = four jitted train steps on the rows of
    `minibatch_rows`, in order: the same parameters, optimizer state and per-update metrics."""
    hf = tiny_hf_model("llama")
    cfg = RLConfig(num_iterations=2, mini_batches=2, epsilon_low=0.1, epsilon_high=0.15,
                   aggregation="token_mean")
    r = random_rollout(2, B=8)
    model = load_pretrained(hf)
    r = jax.tree.map(jnp.asarray, r._replace(old_logps_BxC=np.asarray(
        online.policy_outputs(model, jax.tree.map(jnp.asarray, r), 1.0)[0]) - 0.05))
    tx, mesh = optax.adamw(1e-2), make_mesh()
    graphdef, state, _ = init_train_state(lambda rngs: load_pretrained(hf), tx, mesh, 0)
    step = make_train_step(online.grpo, Models(graphdef), tx, cfg, micro_batches,
                           optax.constant_schedule(1e-2))
    key = jax.random.key(5)
    scanned, stacked = jax.jit(make_update_rollout(step, cfg, mesh))(state, Frozen(), r, key)

    one_step, loop = jax.jit(step), []
    for rows in minibatch_rows(key, 8, 2, 2):
        state, metrics = one_step(state, Frozen(), jax.tree.map(lambda x: x[rows], r))
        loop.append(metrics)
    assert stacked["loss"].shape == (4,)
    for name in ("loss", "grad_norm", "clip_ratio/region_mean", "logp_diff"):
        np.testing.assert_allclose(stacked[name], [m[name] for m in loop], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert float(stacked["clip_ratio/region_mean"][-1]) > 0  # later updates are off-policy
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _sampled(r, rewards, truncated):
    return Sampled(r.prompt_ids_BxP, r.prompt_mask_BxP, r.completion_ids_BxC,
                   r.completion_mask_BxC, r.completion_mask_BxC, r.old_logps_BxC,
                   jnp.asarray(truncated),
                   jnp.asarray(rewards, jnp.float32))


def test_prepare_rollout_grpo_masks_unscored_and_truncated_samples():
    """GRPO with β > 0: the reference's log-probs, group advantages over the scored samples, and a
    loss mask without the unscored (NaN) and, with `mask_truncated`, the truncated samples."""
    hf = tiny_hf_model("llama")
    policy, reference = load_pretrained(hf), load_pretrained(hf)
    reference.embed_tokens.embedding[...] *= 1.5  # a reference unlike the policy
    cfg = RLConfig(num_generations=4, beta=0.04, mask_truncated=True)
    r = jax.tree.map(jnp.asarray, random_rollout(3, B=8, group=4))
    rewards = np.array([1.0, 0.0, np.nan, 1.0, 0.5, 0.5, 0.0, 1.0])
    truncated = np.zeros(8, bool)
    truncated[5] = True
    graphdef, params = nnx.split(policy)
    ref_graphdef, ref_params = nnx.split(reference)
    models = Models(graphdef, reference_graphdef=ref_graphdef)
    out, metrics = prepare_rollout(online.ONLINE_METHODS["grpo"], models, cfg, params,
                                   Frozen(reference=ref_params), None,
                                   _sampled(r, rewards, truncated), jnp.float32(0.0))
    valid = ~np.isnan(rewards)
    want_mask = np.asarray(r.completion_mask_BxC) & valid[:, None] & ~truncated[:, None]
    np.testing.assert_array_equal(out.loss_mask_BxC, want_mask)
    advantages, group = online.losses.group_advantages(jnp.asarray(np.nan_to_num(rewards)), 4,
                                                       valid_B=jnp.asarray(valid))
    np.testing.assert_allclose(out.advantages, advantages, rtol=1e-6)
    assert float(out.advantages[2]) == 0.0 and metrics["reward_std"] == group["reward_std"]
    np.testing.assert_allclose(out.ref_logps_BxC,
                               online.policy_outputs(reference, r, cfg.temperature)[0], rtol=1e-6)
    assert not np.allclose(out.ref_logps_BxC, online.policy_outputs(policy, r, 1.0)[0])


def test_prepare_rollout_ppo_scores_with_the_reward_model_and_the_critic():
    """PPO: the reward model's score at the last token and the critic's values feed
    `ppo_targets`; every completion is trained on (no reward function decides)."""
    hf = tiny_hf_model("llama")
    policy = load_pretrained(hf)
    config = policy.config
    critic = Decoder(config, rngs=nnx.Rngs(1), with_scalar_head=True)
    reward_model = Decoder(config, rngs=nnx.Rngs(2), with_scalar_head=True)
    cfg = RLConfig(num_generations=4, kl_coef=0.1, missing_eos_penalty=1.0)
    r = jax.tree.map(jnp.asarray, random_rollout(4, B=8, group=4))
    r = r._replace(old_logps_BxC=online.policy_outputs(policy, r, 1.0)[0] - 0.1)
    truncated = np.arange(8) % 3 == 0
    graphdef, params = nnx.split(online.ActorCritic(policy, critic))
    ref_graphdef, ref_params = nnx.split(load_pretrained(hf))
    models = Models(graphdef, reference_graphdef=ref_graphdef)
    out, metrics = prepare_rollout(online.ONLINE_METHODS["ppo"], models, cfg, params,
                                   Frozen(reference=ref_params), reward_model,
                                   _sampled(r, np.full(8, np.nan), truncated), jnp.float32(0.1))
    ids = jnp.concatenate([r.prompt_ids_BxP, r.completion_ids_BxC], 1)
    mask = jnp.concatenate([r.prompt_mask_BxP, r.completion_mask_BxC], 1)
    scores = reward_model.score(ids, mask)
    values = online.critic_values(critic, r)
    want, want_metrics = online.ppo_targets(
        r._replace(ref_logps_BxC=online.policy_outputs(policy, r, 1.0)[0]), scores,
        jnp.ones(8, bool), jnp.asarray(truncated), values, jnp.float32(0.1), cfg)
    np.testing.assert_array_equal(out.loss_mask_BxC, r.completion_mask_BxC)
    for name in ("advantages", "returns_BxC", "old_values_BxC"):
        np.testing.assert_allclose(getattr(out, name), getattr(want, name), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # the EOS trick: −1 for each of the 3 truncated completions
    np.testing.assert_allclose(metrics["objective/scores"], np.mean(scores) - 3 / 8, rtol=1e-5)
    np.testing.assert_allclose(metrics["objective/kl"], -0.1 * np.asarray(r.completion_mask_BxC)
                               .sum(1).mean(), rtol=1e-4)
    assert out.ref_logps_BxC is None
