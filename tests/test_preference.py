import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from align_jax.losses import (
    DPO_LOSSES,
    dpo_loss,
    f_divergence_scores,
    kto_desirable_weight,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from tests.np_ref import log_sigmoid, rand, sigmoid

B = 16


def np_dpo(pc, pr, rc, rr, beta, loss_type, ls=0.0, lc=None, lr=None, tau=0.05):
    """Each loss type written from its paper / TRL's documented definition, in float64."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    cl, rl = pc - rc, pr - rr  # chosen / rejected log-ratios
    h = cl - rl
    if loss_type == "sigmoid":
        return -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (cl / lc - rl / lr - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -log_sigmoid(beta * (cl / lc - rl / lr))
    if loss_type == "exo_pair":
        eps = ls or 1e-3
        p_w = sigmoid(beta * h)  # p_θ over {chosen, rejected}; KL(p_θ || [1-ε, ε])
        return p_w * np.log(p_w / (1 - eps)) + (1 - p_w) * np.log((1 - p_w) / eps)
    if loss_type == "robust":
        return ((1 - ls) * -log_sigmoid(beta * h) - ls * -log_sigmoid(-beta * h)) / (1 - 2 * ls)
    if loss_type == "nca_pair":
        return (-log_sigmoid(beta * cl) - 0.5 * log_sigmoid(-beta * cl)
                - 0.5 * log_sigmoid(-beta * rl))
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * cl) - log_sigmoid(-beta * rl)
    if loss_type == "sppo_hard":
        return (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if loss_type == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return -(1 - ls) * log_sigmoid(beta * d) - ls * log_sigmoid(-beta * d)
    if loss_type == "aot_unpaired":
        d = np.sort(cl) - np.sort(rl)
        return -(1 - ls) * log_sigmoid(beta * d) - ls * log_sigmoid(-beta * d)
    if loss_type == "apo_zero":
        return 1 - sigmoid(beta * cl) + sigmoid(beta * rl)
    if loss_type == "apo_down":
        return sigmoid(beta * cl) + 1 - sigmoid(beta * h)
    if loss_type == "discopop":
        x = beta * h
        mix = sigmoid(x / tau)
        return -log_sigmoid(x) * (1 - mix) + np.exp(-x) * mix
    raise AssertionError(loss_type)


def make_pairs(seed, scale=2.0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rand(rng, B, scale=scale, shift=-20.0) for _ in range(4))
    lc = rng.integers(1, 30, size=B).astype(np.float32)
    lr = rng.integers(1, 30, size=B).astype(np.float32)
    return pc, pr, rc, rr, lc, lr


def call(loss_type, pc, pr, rc, rr, lc, lr, beta=0.1, **kw):
    return dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type,
        chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr), **kw,
    )


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_every_dpo_loss_type_matches_numpy_reference(loss_type, beta):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=hash(loss_type) % 1000)
    losses, _ = call(loss_type, pc, pr, rc, rr, lc, lr, beta=beta)
    expected = np_dpo(pc, pr, rc, rr, beta, loss_type, lc=lc, lr=lr)
    assert losses.shape == (B,)
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"])
def test_label_smoothing_matches_numpy_reference(loss_type):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=7)
    losses, _ = call(loss_type, pc, pr, rc, rr, lc, lr, beta=0.2, label_smoothing=0.1)
    expected = np_dpo(pc, pr, rc, rr, 0.2, loss_type, ls=0.1)
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-5)


def test_hand_computed_values():
    """Small cases worked out by hand."""
    one = lambda v: jnp.array([v], jnp.float32)  # noqa: E731
    # h = (-1 - -2) - (-3 - -3) = 1, β = 1: -log σ(1) = log(1 + e^-1) = 0.3132617
    loss, m = dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-3.0), beta=1.0)
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-1))], rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 1.0)
    np.testing.assert_allclose(m["rewards/rejected"], 0.0)
    np.testing.assert_allclose(m["rewards/margins"], 1.0)
    np.testing.assert_allclose(m["rewards/accuracies"], 1.0)
    # IPO with τ = 0.5 and lengths 2, 4: (1/2·1 - 1/4·0 - 1)^2 = 0.25
    loss, _ = dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-3.0), beta=0.5, loss_type="ipo",
                       chosen_lengths=one(2.0), rejected_lengths=one(4.0))
    np.testing.assert_allclose(loss, [0.25], rtol=1e-6)
    # hinge at β h = 0.5: max(0, 1 - 0.5) = 0.5
    loss, _ = dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-3.0), beta=0.5, loss_type="hinge")
    np.testing.assert_allclose(loss, [0.5], rtol=1e-6)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    pc, pr, _, _, lc, lr = make_pairs(seed=1)
    losses, metrics = call("sigmoid", pc, pr, pc, pr, lc, lr, beta=0.3)
    np.testing.assert_allclose(losses, np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], 0.0, atol=1e-6)
    ipo, _ = call("ipo", pc, pr, pc, pr, lc, lr, beta=0.3)
    np.testing.assert_allclose(ipo, (1 / 0.6) ** 2, rtol=1e-6)  # (0 - 1/(2τ))²


def test_swapping_chosen_and_rejected():
    """-log σ(x) - -log σ(-x) = -x: the sigmoid loss is antisymmetric up to the linear term."""
    pc, pr, rc, rr, lc, lr = make_pairs(seed=2)
    fwd, m_fwd = call("sigmoid", pc, pr, rc, rr, lc, lr, beta=0.1)
    bwd, m_bwd = call("sigmoid", pr, pc, rr, rc, lr, lc, beta=0.1)
    h = (pc - rc) - (pr - rr)
    np.testing.assert_allclose(fwd - bwd, -0.1 * h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m_fwd["rewards/margins"], -m_bwd["rewards/margins"], atol=1e-5)
    np.testing.assert_allclose(m_fwd["rewards/accuracies"] + m_bwd["rewards/accuracies"], 1.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop"])
def test_loss_depends_on_reference_only_through_the_log_ratio(loss_type):
    """Adding c to log π(y_w) and log π_ref(y_w) changes nothing."""
    pc, pr, rc, rr, lc, lr = make_pairs(seed=3)
    base, _ = call(loss_type, pc, pr, rc, rr, lc, lr)
    moved, _ = call(loss_type, pc + 5.0, pr - 3.0, rc + 5.0, rr - 3.0, lc, lr)
    np.testing.assert_allclose(base, moved, rtol=1e-4, atol=1e-4)


def test_beta_to_zero_limit_of_sigmoid_loss():
    """As β→0 the DPO loss tends to ln 2 with slope -h/2 (first-order Taylor expansion)."""
    pc, pr, rc, rr, lc, lr = make_pairs(seed=4)
    h = (pc - rc) - (pr - rr)
    beta = 1e-4
    losses, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, beta=beta)
    np.testing.assert_allclose(losses, np.log(2.0) - beta * h / 2, atol=1e-6)


def test_reference_free_equals_zero_reference():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=5)
    free, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, reference_free=True)
    zero, _ = call("sigmoid", pc, pr, 0 * rc, 0 * rr, lc, lr)
    np.testing.assert_allclose(free, zero)


def test_ipo_is_invariant_to_padding_length_but_not_to_completion_length():
    """IPO normalises by the completion token count, so doubling both length and log-ratio is a
    no-op."""
    pc, pr, rc, rr, lc, lr = make_pairs(seed=6, scale=0.5)
    base, _ = call("ipo", pc, pr, rc, rr, lc, lr)
    doubled, _ = call("ipo", 2 * pc, 2 * pr, 2 * rc, 2 * rr, 2 * lc, 2 * lr)
    np.testing.assert_allclose(base, doubled, rtol=1e-4)


def test_f_divergence_scores():
    lr = jnp.linspace(-3.0, 3.0, 13)
    u = np.exp(np.asarray(lr, np.float64))
    np.testing.assert_allclose(f_divergence_scores(lr, "reverse_kl"), np.log(u), rtol=1e-6)
    np.testing.assert_allclose(f_divergence_scores(lr, "forward_kl"), -1 / u, rtol=1e-5)
    np.testing.assert_allclose(f_divergence_scores(lr, "js_divergence"), np.log(u / (1 + u)),
                               rtol=1e-5)
    np.testing.assert_allclose(
        f_divergence_scores(lr, "alpha_divergence", 0.3), u ** (0.3 - 1) / (0.3 - 1), rtol=1e-5
    )
    # α = 0 is forward KL; α → 1 is reverse KL up to a constant.
    np.testing.assert_allclose(
        f_divergence_scores(lr, "alpha_divergence", 0.0), f_divergence_scores(lr, "forward_kl"),
        rtol=1e-6,
    )
    near_one = f_divergence_scores(lr, "alpha_divergence", 1 - 1e-3)
    np.testing.assert_allclose(near_one - near_one[6], lr, atol=1e-2)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_dpo_with_f_divergence_uses_transformed_log_ratios(f_divergence):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=8, scale=0.3)
    rc, rr = pc + 0.2 * rc / 20, pr + 0.2 * rr / 20  # keep the ratios u near 1
    losses, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, beta=0.5, f_divergence=f_divergence,
                     f_alpha=0.4)
    u_w = np.exp(np.float64(pc) - rc)
    u_l = np.exp(np.float64(pr) - rr)
    f_prime = {
        "forward_kl": lambda u: -1 / u,
        "js_divergence": lambda u: np.log(u / (1 + u)),
        "alpha_divergence": lambda u: u ** (0.4 - 1) / (0.4 - 1),
    }[f_divergence]
    expected = -log_sigmoid(0.5 * (f_prime(u_w) - f_prime(u_l)))
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"aot", "aot_unpaired", "hinge"}))
def test_dpo_gradients_match_finite_differences(loss_type):
    pc, pr, rc, rr, lc, lr = make_pairs(seed=9, scale=1.0)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (pc, pr)]
        fixed = dict(
            ref_chosen_logps=jnp.asarray(rc, jnp.float64),
            ref_rejected_logps=jnp.asarray(rr, jnp.float64),
            beta=0.2, loss_type=loss_type,
            chosen_lengths=jnp.asarray(lc, jnp.float64),
            rejected_lengths=jnp.asarray(lr, jnp.float64),
        )
        check_grads(lambda c, r: jnp.sum(dpo_loss(c, r, **fixed)[0]), args, order=2, modes=("rev",))


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
def test_jit_and_vmap_agree_with_eager(loss_type):
    rng = np.random.default_rng(10)
    stacked = [jnp.asarray(rand(rng, 3, B, shift=-10.0)) for _ in range(4)]
    lengths = jnp.asarray(rng.integers(1, 9, size=(3, B)).astype(np.float32))

    def f(pc, pr, rc, rr, lc, lr):
        return dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, chosen_lengths=lc,
                        rejected_lengths=lr)[0]

    vmapped = jax.jit(jax.vmap(f))(*stacked, lengths, lengths + 1)
    for i in range(3):
        eager = f(*(a[i] for a in stacked), lengths[i], lengths[i] + 1)
        np.testing.assert_allclose(vmapped[i], eager, rtol=1e-6, atol=1e-6)


def test_beta_can_be_vmapped():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=11)
    betas = jnp.array([0.1, 0.5, 1.0])
    swept = jax.vmap(lambda b: call("ipo", pc, pr, rc, rr, lc, lr, beta=b)[0])(betas)
    for i, b in enumerate([0.1, 0.5, 1.0]):
        np.testing.assert_allclose(swept[i], np_dpo(pc, pr, rc, rr, b, "ipo", lc=lc, lr=lr),
                                   rtol=2e-5)


def test_bad_arguments_are_clear_errors():
    pc, pr, rc, rr, lc, lr = make_pairs(seed=12)
    with pytest.raises(ValueError, match="Unknown DPO loss_type 'dpo'"):
        call("dpo", pc, pr, rc, rr, lc, lr)
    with pytest.raises(ValueError,
                       match="label_smoothing=0.1 has no effect with loss_type='hinge'"):
        call("hinge", pc, pr, rc, rr, lc, lr, label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="Unknown f_divergence"):
        call("sigmoid", pc, pr, rc, rr, lc, lr, f_divergence="kl")
    with pytest.raises(ValueError, match="beta must be positive"):
        call("sigmoid", pc, pr, rc, rr, lc, lr, beta=0.0)


# ---------------------------------------------------------------- SimPO / ORPO


@pytest.mark.parametrize("length_normalize", [True, False])
def test_simpo_matches_numpy_reference(length_normalize):
    pc, pr, _, _, lc, lr = make_pairs(seed=13)
    losses, m = simpo_loss(*map(jnp.asarray, (pc, pr, lc, lr)), beta=2.0, gamma=0.8,
                           length_normalize=length_normalize)
    rw = 2.0 * (pc / lc if length_normalize else pc)
    rl = 2.0 * (pr / lr if length_normalize else pr)
    np.testing.assert_allclose(losses, -log_sigmoid(np.float64(rw) - rl - 0.8), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], np.mean(np.float64(rw) - rl), rtol=1e-4)


def test_simpo_label_smoothing_and_gamma_shift():
    pc, pr, _, _, lc, lr = make_pairs(seed=14)
    a = list(map(jnp.asarray, (pc, pr, lc, lr)))
    smoothed, _ = simpo_loss(*a, beta=1.0, gamma=0.0, label_smoothing=0.2)
    x = np.float64(pc) / lc - np.float64(pr) / lr
    np.testing.assert_allclose(smoothed, -0.8 * log_sigmoid(x) - 0.2 * log_sigmoid(-x), rtol=1e-5)


def test_orpo_matches_numpy_reference():
    rng = np.random.default_rng(15)
    lc = rng.integers(1, 20, size=B).astype(np.float32)
    lr = rng.integers(1, 20, size=B).astype(np.float32)
    pc = (-rng.uniform(0.01, 3.0, size=B) * lc).astype(np.float32)
    pr = (-rng.uniform(0.01, 3.0, size=B) * lr).astype(np.float32)
    losses, m = orpo_loss(*map(jnp.asarray, (pc, pr, lc, lr)), beta=0.25)
    aw, al = np.float64(pc) / lc, np.float64(pr) / lr
    log_odds = np.log(np.exp(aw) / (1 - np.exp(aw))) - np.log(np.exp(al) / (1 - np.exp(al)))
    np.testing.assert_allclose(losses, -0.25 * log_sigmoid(log_odds), rtol=1e-4)
    np.testing.assert_allclose(m["log_odds_chosen"], log_odds.mean(), rtol=1e-4)
    with jax.enable_x64(True):
        check_grads(
            lambda c, r: jnp.sum(orpo_loss(c, r, jnp.asarray(lc, jnp.float64),
                                           jnp.asarray(lr, jnp.float64))[0]),
            [jnp.asarray(pc, jnp.float64), jnp.asarray(pr, jnp.float64)], order=1, modes=("rev",),
        )


# ---------------------------------------------------------------- KTO


def np_kto(logps, ref, desirable, kl_logps, kl_ref, beta, wd, wu):
    r = np.float64(logps) - ref
    z0 = max(np.mean(np.float64(kl_logps) - kl_ref), 0.0)
    return np.where(desirable, wd * (1 - sigmoid(beta * (r - z0))),
                    wu * (1 - sigmoid(beta * (z0 - r)))), z0


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # z0 positive, and clamped at 0
def test_kto_matches_numpy_reference(kl_shift):
    rng = np.random.default_rng(16)
    logps, ref, kl_ref = (rand(rng, B, shift=-10.0) for _ in range(3))
    kl_logps = kl_ref + kl_shift + rand(rng, B, scale=0.1)
    desirable = rng.random(B) < 0.4
    losses, m = kto_loss(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(desirable), beta=0.3,
                         kl_logps=jnp.asarray(kl_logps), kl_ref_logps=jnp.asarray(kl_ref),
                         desirable_weight=1.5, undesirable_weight=0.7)
    expected, z0 = np_kto(logps, ref, desirable, kl_logps, kl_ref, 0.3, 1.5, 0.7)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["kl"], z0, atol=1e-5)
    rewards = 0.3 * (np.float64(logps) - ref)
    np.testing.assert_allclose(m["rewards/chosen"], rewards[desirable].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], rewards[~desirable].mean(), rtol=1e-5)


def test_kto_reference_point_carries_no_gradient():
    rng = np.random.default_rng(17)
    logps, ref, kl_logps, kl_ref = (jnp.asarray(rand(rng, B, shift=-5.0)) for _ in range(4))
    desirable = jnp.arange(B) % 3 == 0

    def total(kl_lp):
        return jnp.sum(kto_loss(logps, ref, desirable, kl_logps=kl_lp,
                                kl_ref_logps=kl_ref - 1.0)[0])

    np.testing.assert_array_equal(jax.grad(total)(kl_logps), np.zeros(B))


def test_kto_apo_zero_unpaired_and_errors():
    rng = np.random.default_rng(18)
    logps, ref = rand(rng, B, shift=-5.0), rand(rng, B, shift=-5.0)
    desirable = rng.random(B) < 0.5
    losses, m = kto_loss(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(desirable), beta=0.2,
                         loss_type="apo_zero_unpaired")
    r = 0.2 * (np.float64(logps) - ref)
    np.testing.assert_allclose(losses, np.where(desirable, 1 - sigmoid(r), sigmoid(r)), rtol=1e-5)
    assert float(m["kl"]) == 0.0
    with pytest.raises(ValueError, match="kto needs kl_logps"):
        kto_loss(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(desirable))
    with pytest.raises(ValueError, match="Unknown KTO loss_type"):
        kto_loss(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(desirable), loss_type="bco")


def test_kto_desirable_weight_rule():
    assert kto_desirable_weight(100, 900) == pytest.approx(9.0)
    assert kto_desirable_weight(100, 900, target=4 / 3) == pytest.approx(12.0)
    with pytest.raises(ValueError, match=r"\[1, 4/3\]"):
        kto_desirable_weight(100, 900, target=2.0)
