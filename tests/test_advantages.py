import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.losses import gae, group_advantages, rloo_advantages
from tests.np_ref import rand


def np_group(rewards, G, scale, eps=1e-4):
    r = np.float64(rewards).reshape(-1, G)
    centred = r - r.mean(1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + eps)
    return centred.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy_and_sum_to_zero(scale):
    rng = np.random.default_rng(0)
    rewards = rand(rng, 5 * 8)
    adv, _ = group_advantages(jnp.asarray(rewards), 8, scale=scale)
    np.testing.assert_allclose(adv, np_group(rewards, 8, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv).reshape(5, 8).sum(1), 0.0, atol=1e-5)


def test_group_advantages_hand_values_and_zero_std_groups():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, m = group_advantages(rewards, 4)
    std = np.std([1, 0, 0, 0], ddof=1)  # 0.5
    np.testing.assert_allclose(adv[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4),
                               rtol=1e-5)
    np.testing.assert_allclose(adv[4:], 0.0)  # all-equal group: no signal
    np.testing.assert_allclose(m["frac_reward_zero_std"], 0.5)
    np.testing.assert_allclose(m["reward_std"], std / 2, rtol=1e-6)


def test_dr_grpo_advantages_are_shift_invariant_and_scale_equivariant():
    rng = np.random.default_rng(1)
    r = jnp.asarray(rand(rng, 24))
    base, _ = group_advantages(r, 6, scale="none")
    np.testing.assert_allclose(group_advantages(3.0 * r + 7.0, 6, scale="none")[0], 3.0 * base,
                               rtol=1e-4, atol=1e-5)
    grpo, _ = group_advantages(r, 6)  # std-scaled: invariant to positive affine maps (up to eps)
    np.testing.assert_allclose(group_advantages(3.0 * r + 7.0, 6)[0], grpo, rtol=1e-3, atol=1e-3)


def test_rloo_is_leave_one_out():
    rng = np.random.default_rng(2)
    rewards = np.float64(rand(rng, 3 * 4)).reshape(3, 4)
    expected = np.array([[r[i] - np.delete(r, i).mean() for i in range(4)]
                         for r in rewards]).reshape(-1)
    adv = rloo_advantages(jnp.asarray(rewards.reshape(-1), jnp.float32), 4)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    centred, _ = group_advantages(jnp.asarray(rewards.reshape(-1), jnp.float32), 4, scale="none")
    np.testing.assert_allclose(adv, 4 / 3 * centred, rtol=1e-5, atol=1e-6)


def test_group_shape_errors():
    with pytest.raises(ValueError, match="do not split into groups of size 4"):
        group_advantages(jnp.ones(10), 4)
    with pytest.raises(ValueError, match="Unknown advantage scale"):
        group_advantages(jnp.ones(8), 4, scale="global")
    with pytest.raises(ValueError, match="RLOO needs group_size >= 2"):
        rloo_advantages(jnp.ones(8), 1)


def np_gae(rewards, values, gamma, lam):
    """Textbook backward recursion on one un-padded trajectory."""
    T = len(rewards)
    adv = np.zeros(T)
    last = 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_numpy_and_masked_equals_sliced():
    rng = np.random.default_rng(3)
    lengths = [7, 3, 1, 5]
    rewards, values = rand(rng, 4, 7), rand(rng, 4, 7)
    rewards[1, 3:] = 99.0  # garbage on padding must not matter
    values[1, 3:] = -99.0
    mask = np.arange(7)[None, :] < np.array(lengths)[:, None]
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = np_gae(np.float64(rewards[i, :n]), np.float64(values[i, :n]), 0.9, 0.8)
        np.testing.assert_allclose(adv[i, :n], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[i, :n], expected + values[i, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(adv[i, n:], 0.0)


def test_gae_skips_masked_tokens_between_valid_ones():
    """An environment's tokens between two turns carry no reward, value or advantage: GAE over
    the row with them masked equals GAE over the policy's tokens alone, side by side."""
    rng = np.random.default_rng(6)
    rewards, values = rand(rng, 2, 9), rand(rng, 2, 9)
    mask = np.array([[1, 1, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 1, 0, 0, 0]], bool)
    rewards[~mask], values[~mask] = 99.0, -99.0
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.8)
    for i in range(2):
        expected = np_gae(np.float64(rewards[i, mask[i]]), np.float64(values[i, mask[i]]), 0.9, 0.8)
        np.testing.assert_allclose(adv[i, mask[i]], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[i, mask[i]], expected + values[i, mask[i]], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(adv[i, ~mask[i]], 0.0)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    rng = np.random.default_rng(4)
    rewards, values = rand(rng, 2, 6), rand(rng, 2, 6)
    mask = np.ones((2, 6), bool)
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=1.0, lam=1.0)
    mc_return = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(ret, mc_return, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, mc_return - values, rtol=1e-5, atol=1e-5)


def test_gae_jits():
    rng = np.random.default_rng(5)
    args = (jnp.asarray(rand(rng, 3, 4)), jnp.asarray(rand(rng, 3, 4)), jnp.ones((3, 4)))
    eager = gae(*args, gamma=0.99, lam=0.95)
    jitted = jax.jit(lambda r, v, m: gae(r, v, m, gamma=0.99, lam=0.95))(*args)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
