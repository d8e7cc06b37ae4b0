"""The sparse mixture of experts (grouped products over assignments sorted by expert) equals the
dense-equivalent reference (every expert on every token, weighted), forward and backward; split
into slices of experts, the slices' outputs sum to the whole (what expert parallelism adds up);
the router's top-k and the load-balancing loss against NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import moe

R, D, E, I, K = 24, 16, 6, 12, 2  # noqa: E741
ACT = jax.nn.silu


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(E, D, I)) / 4, jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(E, I, D)) / 4, jnp.float32)
    routing = moe.route(jnp.asarray(rng.normal(size=(R, E)), jnp.float32), K, True, jnp.float32)
    return x, routing, gate, up, down


@pytest.mark.parametrize("path", ["forward", "gradients"])
def test_sparse_experts_equal_the_dense_reference(path):
    x, routing, gate, up, down = inputs()

    def out(experts_fn, x, weights, gate, up, down):
        return experts_fn(x, routing.experts_RxK, weights, gate, up, down, ACT)

    args = (x, routing.weights_RxK, gate, up, down)
    if path == "forward":
        np.testing.assert_allclose(out(moe.sparse_experts, *args), out(moe.dense_experts, *args),
                                   atol=1e-5)
        return
    loss = lambda fn: lambda *a: jnp.sum(out(fn, *a) ** 2)  # noqa: E731
    sparse = jax.grad(loss(moe.sparse_experts), argnums=range(5))(*args)
    dense = jax.grad(loss(moe.dense_experts), argnums=range(5))(*args)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), sparse, dense):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=name)


def test_slices_of_experts_sum_to_all_of_them():
    x, routing, gate, up, down = inputs(1)
    whole = moe.sparse_experts(x, routing.experts_RxK, routing.weights_RxK, gate, up, down, ACT)
    parts = sum(moe.sparse_experts(x, routing.experts_RxK, routing.weights_RxK,
                                   gate[s:s + 2], up[s:s + 2], down[s:s + 2], ACT, first=s)
                for s in range(0, E, 2))
    np.testing.assert_allclose(parts, whole, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_is_softmax_top_k(normalize):
    logits = np.random.default_rng(2).normal(size=(R, E)).astype(np.float32)
    routing = moe.route(jnp.asarray(logits), K, normalize, jnp.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :K]
    weights = np.take_along_axis(probs, top, -1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    np.testing.assert_array_equal(routing.experts_RxK, top)
    np.testing.assert_allclose(routing.weights_RxK, weights, rtol=1e-6)


def test_balance_loss_pools_layers_and_skips_pads():
    """E · Σ_e f_e P_e over two layers' routings, pads excluded; k for a perfectly even router."""
    rng = np.random.default_rng(3)
    mask = np.arange(R) % 5 != 0
    routings = [moe.route(jnp.asarray(rng.normal(size=(R, E)), jnp.float32), K, True,
                          jnp.float32) for _ in range(2)]
    counts = functools.reduce(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                              (moe.router_counts(r, jnp.asarray(mask)) for r in routings))
    got = moe.balance_loss(*counts, 2 * mask.sum())
    chosen = sum(np.eye(E)[np.asarray(r.experts_RxK)][mask].sum((0, 1)) for r in routings)
    probs = sum(np.asarray(r.probs_RxE)[mask].sum(0) for r in routings)
    n = 2 * mask.sum()
    np.testing.assert_allclose(got, E * np.sum(chosen / n * probs / n), rtol=1e-6)
    even = moe.balance_loss(jnp.full(E, K * n / E), jnp.full(E, n / E), n)
    np.testing.assert_allclose(even, K, rtol=1e-6)
