import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import ops
from tests.np_ref import log_softmax, rand


def test_token_logps_matches_log_softmax_gather():
    rng = np.random.default_rng(0)
    logits = rand(rng, 3, 5, 11, scale=3.0)
    labels = rng.integers(0, 11, size=(3, 5))
    expected = np.take_along_axis(log_softmax(logits), labels[..., None], -1)[..., 0]
    got = ops.token_logps(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_token_logps_bf16_logits_are_normalised_in_float32():
    rng = np.random.default_rng(1)
    logits_bf16 = jnp.asarray(rand(rng, 2, 4, 4096, scale=4.0), dtype=jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 4096, size=(2, 4)))
    exact = log_softmax(np.asarray(logits_bf16.astype(jnp.float32)))
    expected = np.take_along_axis(exact, np.asarray(labels)[..., None], -1)[..., 0]
    got = ops.token_logps(logits_bf16, labels)
    assert got.dtype == jnp.float32
    # A bf16 log-softmax would be off by ~0.05 at this vocabulary size; float32 is exact.
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_token_logps_forms_no_second_full_size_array():
    """The compiled program's largest temporary is not another B×L×V buffer."""
    logits = jax.ShapeDtypeStruct((4, 64, 8192), jnp.float32)
    labels = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    compiled = jax.jit(ops.token_logps).lower(logits, labels).compile()
    analysis = compiled.memory_analysis()
    full_bytes = 4 * 64 * 8192 * 4
    assert analysis.temp_size_in_bytes < full_bytes / 4


def test_entropy_from_logits():
    rng = np.random.default_rng(2)
    logits = rand(rng, 2, 3, 7, scale=2.0)
    logp = log_softmax(logits)
    expected = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(ops.entropy_from_logits(jnp.asarray(logits)), expected, atol=1e-5)
    uniform = ops.entropy_from_logits(jnp.zeros((1, 1, 7)))
    np.testing.assert_allclose(uniform, np.log(7.0), atol=1e-6)


def test_masked_reductions_equal_sliced_numpy():
    rng = np.random.default_rng(3)
    x = rand(rng, 4, 6)
    lengths = np.array([6, 3, 1, 4])
    mask = np.arange(6)[None, :] < lengths[:, None]
    rows = [x[i, : lengths[i]] for i in range(4)]
    np.testing.assert_allclose(ops.masked_sum(x, mask, axis=1), [r.sum() for r in rows], atol=1e-5)
    np.testing.assert_allclose(ops.masked_mean(x, mask, axis=1), [r.mean() for r in rows],
                               atol=1e-6)
    flat = x[mask]
    np.testing.assert_allclose(ops.masked_mean(x, mask), flat.mean(), atol=1e-6)
    np.testing.assert_allclose(ops.masked_var(x, mask), flat.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(ops.masked_var(x, mask, unbiased=False), flat.var(), rtol=1e-5)
    whitened = np.asarray(ops.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(whitened[mask], (flat - flat.mean()) / flat.std(ddof=1), atol=1e-4)
    assert np.all(whitened[~mask] == 0)
    kept = ops.masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False)
    np.testing.assert_allclose(np.asarray(kept)[mask].mean(), flat.mean(), atol=1e-5)


def test_masked_values_do_not_leak_into_results_or_gradients():
    x = jnp.array([1.0, 2.0, jnp.inf])
    mask = jnp.array([True, True, False])
    assert float(ops.masked_mean(x, mask)) == 1.5
    grad = jax.grad(lambda v: ops.masked_mean(v, mask))(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(grad, [0.5, 0.5, 0.0])


def test_masked_mean_of_empty_mask_is_zero():
    assert float(ops.masked_mean(jnp.ones(3), jnp.zeros(3, bool))) == 0.0


def test_kl_estimators_formulas_and_unbiasedness():
    rng = np.random.default_rng(4)
    logits_p, logits_q = rand(rng, 10), rand(rng, 10)
    logp, logq = log_softmax(logits_p), log_softmax(logits_q)
    exact_kl = float((np.exp(logp) * (logp - logq)).sum())
    samples = rng.choice(10, size=400_000, p=np.exp(logp))
    lp, lq = jnp.asarray(logp[samples], jnp.float32), jnp.asarray(logq[samples], jnp.float32)
    k1, k2, k3 = ops.kl_k1(lp, lq), ops.kl_k2(lp, lq), ops.kl_k3(lp, lq)
    np.testing.assert_allclose(k1, logp[samples] - logq[samples], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k2, 0.5 * (logp[samples] - logq[samples]) ** 2, rtol=1e-5, atol=1e-6)
    r = np.exp(logq[samples] - logp[samples])
    np.testing.assert_allclose(k3, r - 1 - np.log(r), rtol=1e-4, atol=1e-6)
    assert float(jnp.min(k3)) >= 0.0
    # k1 and k3 are unbiased; the Monte Carlo error of 4e5 samples is well below 0.01 here.
    assert abs(float(jnp.mean(k1)) - exact_kl) < 0.01
    assert abs(float(jnp.mean(k3)) - exact_kl) < 0.01


@pytest.mark.parametrize("x", [-1e-7, -1e-3, -0.5, -0.7, -1.0, -30.0])
def test_log1mexp(x):
    x64 = np.float64(x)  # both float64 forms are accurate on their own side of -ln 2
    expected = np.log(-np.expm1(x64)) if x64 > -np.log(2) else np.log1p(-np.exp(x64))
    np.testing.assert_allclose(ops.log1mexp(jnp.float32(x)), expected, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunked_head_equals_the_whole_head_values_and_gradients(chunk):
    """Log-probs, entropy and argmax from chunks of positions (T = 13 is no multiple of 4 or 5)
    equal those of the whole [B, T, V] logits, and so do the gradients through them."""
    B, T, D, V = 3, 13, 8, 50
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (B, T, D))
    weight = jax.random.normal(keys[1], (D, V))
    labels = jax.random.randint(keys[2], (B, T), 0, V)

    def loss(hidden, weight, chunk):
        s = ops.head_token_stats(lambda h: h @ weight, hidden, labels, chunk=chunk, temperature=0.7,
                                 entropy=True, correct=True)
        return jnp.sum(s["logps"] * jnp.arange(T)) + jnp.sum(s["entropy"]), s

    (whole, s_whole), g_whole = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, weight, None)
    (part, s_part), g_part = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True),
                                     static_argnums=2)(hidden, weight, chunk)
    logits = (hidden @ weight) / 0.7
    np.testing.assert_allclose(s_whole["logps"], jax.nn.log_softmax(logits)[
        jnp.arange(B)[:, None], jnp.arange(T), labels], rtol=1e-5)
    # both are differences of terms as large as the logits (|z| up to ~12 here), whose float32
    # rounding (ulp 1e-6) depends on how XLA fuses the reductions: a few ulps of |z| apart
    for k in ("logps", "entropy"):
        np.testing.assert_allclose(s_part[k], s_whole[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s_part["correct"], jnp.argmax(logits, -1) == labels)
    np.testing.assert_allclose(part, whole, rtol=1e-5)
    for a, b in zip(g_part, g_whole):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_head_memory_does_not_grow_with_positions_times_vocabulary():
    """Compiled for the CPU, the temporaries of a chunked head's forward and backward grow with
    B·T·D, not with the B·T·V logits that the whole head holds."""
    B, D, V = 2, 16, 8192

    def temp_bytes(T, chunk):
        hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
        weight = jax.ShapeDtypeStruct((D, V), jnp.float32)
        labels = jax.ShapeDtypeStruct((B, T), jnp.int32)

        def loss(hidden, weight, labels):
            return jnp.sum(ops.head_token_stats(lambda h: h @ weight, hidden, labels,
                                                chunk=chunk)["logps"])
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, weight, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = lambda T: B * T * V * 4  # noqa: E731
    assert temp_bytes(512, None) >= logits_bytes(512)  # the whole head holds the logits
    assert temp_bytes(512, 32) < logits_bytes(512) / 4
    growth = temp_bytes(2048, 32) - temp_bytes(512, 32)
    assert growth < (logits_bytes(2048) - logits_bytes(512)) / 16
