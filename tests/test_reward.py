import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from align_jax.losses import bradley_terry_loss
from tests.np_ref import log_sigmoid, rand


def test_bradley_terry_matches_numpy_with_margin_and_centering():
    rng = np.random.default_rng(0)
    rw, rl, margin = rand(rng, 12), rand(rng, 12), np.abs(rand(rng, 12))
    losses, m = bradley_terry_loss(jnp.asarray(rw), jnp.asarray(rl), margin=jnp.asarray(margin),
                                   center_coef=0.01)
    expected = -log_sigmoid(np.float64(rw) - rl - margin) + 0.01 * (np.float64(rw) + rl) ** 2
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean(rw > rl))
    np.testing.assert_allclose(m["margin"], np.mean(np.float64(rw) - rl), rtol=1e-5)


def test_bradley_terry_hand_values_and_symmetry():
    loss, m = bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # equal rewards: ln 2
    assert float(m["accuracy"]) == 0.0
    rng = np.random.default_rng(1)
    rw, rl = jnp.asarray(rand(rng, 8)), jnp.asarray(rand(rng, 8))
    fwd, _ = bradley_terry_loss(rw, rl)
    bwd, _ = bradley_terry_loss(rl, rw)
    np.testing.assert_allclose(fwd - bwd, -(rw - rl), rtol=1e-5, atol=1e-6)
    shifted, _ = bradley_terry_loss(rw + 3.0, rl + 3.0)  # BT is shift-invariant without centering
    np.testing.assert_allclose(fwd, shifted, rtol=1e-5)


def test_bradley_terry_gradients():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        args = [jnp.asarray(rand(rng, 6), jnp.float64) for _ in range(2)]
        check_grads(lambda a, b: jnp.sum(bradley_terry_loss(a, b, center_coef=0.1)[0]), args,
                    order=2)
