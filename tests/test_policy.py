import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.losses import (
    AGGREGATIONS,
    aggregate_loss,
    policy_loss,
    truncated_importance_weights,
    value_loss,
)
from tests.np_ref import rand

B, L = 6, 9


def batch(seed, ratio_scale=0.3):
    rng = np.random.default_rng(seed)
    old = rand(rng, B, L, shift=-2.0)
    new = old + rand(rng, B, L, scale=ratio_scale)
    adv = rand(rng, B)
    lengths = rng.integers(1, L + 1, size=B)
    mask = np.arange(L)[None, :] < lengths[:, None]
    return new, old, adv, mask


def np_clip(new, old, adv, mask, el, eh, level="token", dual=None):
    log_ratio = np.float64(new) - old
    if level == "sequence":
        log_ratio = np.array([[log_ratio[b, mask[b]].mean()] * L for b in range(B)])
    ratio = np.exp(log_ratio)
    A = adv[:, None] * np.ones((1, L))
    obj = np.minimum(ratio * A, np.clip(ratio, 1 - el, 1 + eh) * A)
    if dual is not None:
        obj = np.where(A < 0, np.maximum(obj, dual * A), obj)
    return np.where(mask, -obj, 0.0), ratio, A


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_surrogate_matches_numpy(level, eps):
    new, old, adv, mask = batch(0, ratio_scale=0.3 if level == "token" else 2.0)
    loss, m = policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                          epsilon_low=eps[0], epsilon_high=eps[1], ratio_level=level)
    expected, ratio, A = np_clip(new, old, adv, mask, *eps, level=level)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    low = (ratio < 1 - eps[0]) & (A < 0)
    high = (ratio > 1 + eps[1]) & (A > 0)
    np.testing.assert_allclose(m["clip_ratio/low_mean"], low[mask].mean(), atol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/high_mean"], high[mask].mean(), atol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/region_mean"], (low | high)[mask].mean(), atol=1e-6)
    assert 0 < float(m["clip_ratio/region_mean"]) < 1  # the test data exercises clipping


def test_dual_clip_bounds_negative_advantage_loss():
    new, old, adv, mask = batch(1, ratio_scale=2.0)
    loss, _ = policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                          dual_clip=3.0)
    expected, _, A = np_clip(new, old, adv, mask, 0.2, 0.2, dual=3.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(loss)[(A < 0) & mask] <= -3.0 * A[(A < 0) & mask] + 1e-5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                    dual_clip=0.5)


def test_cispo_value_and_gradient():
    new, old, adv, mask = batch(2, ratio_scale=2.0)
    args = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))

    def total(lp):
        return jnp.sum(policy_loss(lp, *args, loss_type="cispo", cispo_max_ratio=2.0)[0])

    weight = np.minimum(np.exp(np.float64(new) - old), 2.0)
    expected = np.where(mask, -weight * adv[:, None] * new, 0.0)
    np.testing.assert_allclose(policy_loss(jnp.asarray(new), *args, loss_type="cispo",
                                           cispo_max_ratio=2.0)[0],
                               expected, rtol=1e-4, atol=1e-5)
    # The weight is detached: ∂/∂log π = -sg(w)·A on every unmasked token, clipped or not.
    np.testing.assert_allclose(jax.grad(total)(jnp.asarray(new)),
                               np.where(mask, -weight * adv[:, None], 0.0), rtol=1e-4, atol=1e-5)


def test_on_policy_gradient_is_reinforce_with_group_baseline():
    """With π_old = π (μ = 1) and β = 0, ∇ loss = -1/B Σ_b A_b / |o_b| Σ_t ∇ log π(o_bt)."""
    new, _, adv, mask = batch(3)
    lengths = mask.sum(1)

    def loss_fn(lp, level):
        per_token, _ = policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv),
                                   jnp.asarray(mask), ratio_level=level)
        num, den = aggregate_loss(per_token, jnp.asarray(mask), "sequence_mean")
        return num / den

    expected = np.where(mask, -adv[:, None] / lengths[:, None] / B, 0.0)
    for level in ("token", "sequence"):
        grad = jax.grad(loss_fn)(jnp.asarray(new), level)
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_k3_penalty_and_entropy_bonus():
    new, old, adv, mask = batch(4)
    rng = np.random.default_rng(4)
    ref = new + rand(rng, B, L, scale=0.5)
    ent = np.abs(rand(rng, B, L))
    base, _ = policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    full, m = policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                          ref_logps_BxT=jnp.asarray(ref), beta=0.04, entropy_BxT=jnp.asarray(ent),
                          entropy_coef=0.01)
    k3 = np.exp(np.float64(ref) - new) - (np.float64(ref) - new) - 1
    np.testing.assert_allclose(full - base, np.where(mask, 0.04 * k3 - 0.01 * ent, 0.0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(m["kl"], k3[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], ent[mask].mean(), rtol=1e-5)
    _, m0 = policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                        ref_logps_BxT=jnp.asarray(ref), beta=0.0)
    assert "kl" not in m0  # β = 0 skips the reference entirely


def test_truncated_importance_weights_scale_the_surrogate_only():
    """w = min(π_old / π_sampler, cap) (1 on padding) multiplies the clipped surrogate, value and
    gradient, and leaves the KL penalty as it was (TRL's token_truncate)."""
    new, old, adv, mask = batch(5)
    rng = np.random.default_rng(5)
    sampler = old + rand(rng, B, L, scale=0.3)
    ref = new + rand(rng, B, L, scale=0.5)
    w = truncated_importance_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask),
                                     1.2)
    want = np.where(mask, np.minimum(np.exp(np.float64(old) - sampler), 1.2), 1.0)
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert (want == 1.2).any() and (want < 1).any()  # some capped, some down-weighted
    args = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    kw = dict(ref_logps_BxT=jnp.asarray(ref), beta=0.04)

    def loss(logps, weights):
        return policy_loss(logps, *args, is_weights_BxT=weights, **kw)[0]

    plain, weighted = loss(jnp.asarray(new), None), loss(jnp.asarray(new), w)
    k3 = np.where(mask, 0.04 * (np.exp(np.float64(ref) - new) - (np.float64(ref) - new) - 1), 0)
    np.testing.assert_allclose(weighted - k3, (plain - k3) * want, rtol=1e-4, atol=1e-6)
    # each token's loss depends on its own log-prob: its gradient is scaled by its weight
    grads = [jax.grad(lambda x, w_=w_: jnp.sum(policy_loss(x, *args, is_weights_BxT=w_)[0]))(
        jnp.asarray(new)) for w_ in (None, w)]
    np.testing.assert_allclose(grads[1], grads[0] * want, rtol=1e-5, atol=1e-8)


def test_per_token_advantages_and_padding_garbage():
    new, old, _, mask = batch(5)
    rng = np.random.default_rng(5)
    adv_BxT = rand(rng, B, L)
    new[~mask] = 500.0  # would overflow exp(ratio) if padding were not masked before exp
    old[~mask] = -500.0
    lp = jnp.asarray(new)

    def total(x):
        return jnp.sum(policy_loss(x, jnp.asarray(old), jnp.asarray(adv_BxT), jnp.asarray(mask))[0])

    grad = jax.grad(total)(lp)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
    loss, _ = policy_loss(lp, jnp.asarray(old), jnp.asarray(adv_BxT), jnp.asarray(mask))
    ratio = np.exp(np.where(mask, np.float64(new) - old, 0.0))
    expected = -np.minimum(ratio * adv_BxT, np.clip(ratio, 0.8, 1.2) * adv_BxT)
    np.testing.assert_allclose(np.asarray(loss)[mask], expected[mask], rtol=1e-5, atol=1e-6)


def np_aggregate(per_token, mask, mode, max_len):
    lt = np.where(mask, per_token, 0.0)
    if mode == "sequence_mean":
        return np.mean(lt.sum(1) / mask.sum(1))
    if mode in ("token_mean", "batch_token_mean"):
        return lt.sum() / mask.sum()
    if mode == "token_sum_over_max_len":
        return lt.sum() / (len(lt) * max_len)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_modes_match_numpy(mode):
    rng = np.random.default_rng(6)
    per_token = rand(rng, B, L)
    _, _, _, mask = batch(6)
    num, den = aggregate_loss(jnp.asarray(per_token), jnp.asarray(mask), mode, max_length=16)
    np.testing.assert_allclose(num / den, np_aggregate(per_token, mask, mode, 16), rtol=1e-5)


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "token_sum_over_max_len"])
def test_micro_batches_accumulate_to_the_full_batch_loss(mode):
    rng = np.random.default_rng(7)
    per_token = jnp.asarray(rand(rng, B, L))
    mask = jnp.asarray(batch(7)[3])
    full = aggregate_loss(per_token, mask, mode)
    halves = [aggregate_loss(per_token[s], mask[s], mode, max_length=L)
              for s in (slice(0, 2), slice(2, B))]
    np.testing.assert_allclose(sum(h[0] for h in halves) / sum(h[1] for h in halves),
                               full[0] / full[1], rtol=1e-5)


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="Unknown aggregation mode 'grpo'"):
        aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), "grpo")


def test_length_bias_of_sequence_mean_vs_dr_grpo():
    """Dr. GRPO's point: with a negative advantage, sequence_mean penalises each token of a long
    answer less than a short one's; the constant normaliser gives every token the same weight."""
    mask = jnp.asarray(np.arange(8)[None, :] < np.array([[2], [8]]))
    adv = jnp.array([-1.0, -1.0])
    lp = jnp.zeros((2, 8))

    def grad(mode):
        return jax.grad(lambda x: jnp.divide(*aggregate_loss(
            policy_loss(x, jax.lax.stop_gradient(x), adv, mask)[0], mask, mode)))(lp)

    g = grad("sequence_mean")
    assert float(g[0, 0]) == pytest.approx(4 * float(g[1, 0]))
    g = grad("token_sum_over_max_len")
    assert float(g[0, 0]) == pytest.approx(float(g[1, 0]))


def test_value_loss_matches_numpy():
    rng = np.random.default_rng(8)
    values, old, returns = rand(rng, B, L), rand(rng, B, L), rand(rng, B, L)
    mask = batch(8)[3]
    loss, m = value_loss(*map(jnp.asarray, (values, old, returns, mask)), clip_range=0.2)
    clipped = np.clip(values, old - 0.2, old + 0.2)
    e1, e2 = (np.float64(values) - returns) ** 2, (clipped - np.float64(returns)) ** 2
    np.testing.assert_allclose(loss, np.where(mask, 0.5 * np.maximum(e1, e2), 0.0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(m["vf_clipfrac"], (e2 > e1)[mask].mean(), atol=1e-6)
