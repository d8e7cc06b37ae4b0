"""`quant.quantize` equals NumPy references written from the definitions (per-column absmax int8;
per-block nearest NF4 code by brute force), its round trip stays within half a quantization step,
and it keeps its contracts: dtypes, shapes, jit, vmap, leading axes, unknown kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

from align_jax.models import quant

# QLoRA (Dettmers et al. 2023), Appendix E, and bitsandbytes `functional.py`.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
SHAPES = [(128, 3), (100, 5), (2, 70, 4)]  # I = 2·64, I not a multiple of 64, a leading L axis


def kernel(shape, seed=0):
    """Normal weights with a zero column, a zero block-row (inputs 0..63 of column 1) and ties."""
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    w[..., :, 0] = 0.0
    w[..., :64, 1] = 0.0
    w[..., -1, -1] = -np.abs(w[..., :, -1]).max(axis=-1)  # two entries of equal |w| in a column
    return w


def reference(w, kind):
    """(codes, scale, per-element scale) of w [..., I, O] from the definitions, in NumPy."""
    n_in = w.shape[-2]
    if kind == "int8":
        scale = np.abs(w).max(axis=-2, keepdims=True) / np.float32(127)
        scale[scale == 0] = 1
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale, scale
    starts = range(0, n_in, quant.NF4_BLOCK)
    absmax = np.stack([np.abs(w[..., s:s + quant.NF4_BLOCK, :]).max(axis=-2) for s in starts], -2)
    absmax[absmax == 0] = 1
    per_element = np.repeat(absmax, quant.NF4_BLOCK, axis=-2)[..., :n_in, :]
    distance = np.abs((w / per_element)[..., None] - np.float32(PUBLISHED_NF4))
    return distance.argmin(axis=-1), absmax, per_element


def test_nf4_code_is_the_published_table():
    assert quant.NF4_CODE.dtype == np.float32 and quant.NF4_CODE.shape == (16,)
    np.testing.assert_allclose(quant.NF4_CODE, PUBLISHED_NF4, rtol=0, atol=1e-7)
    assert np.all(np.diff(quant.NF4_CODE) > 0)
    assert {-1.0, 0.0, 1.0} <= set(quant.NF4_CODE.tolist())


def test_nf4_code_is_qloras_construction():
    """Quantiles of N(0, 1) at 8 (9) evenly spaced probabilities from 0.9677083 down to 0.5 for the
    negative (positive) half, one zero, normalised by the largest (bitsandbytes
    `create_normal_map`); the table holds their float32 roundings."""
    p = 0.9677083
    values = np.concatenate([-ndtri(np.linspace(p, 0.5, 8)[:-1]), [0.0],
                             ndtri(np.linspace(p, 0.5, 9)[:-1])])
    values = np.sort(values) / values.max()
    np.testing.assert_allclose(quant.NF4_CODE, values, rtol=0, atol=2e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_quantize_equals_reference(kind, shape):
    w = kernel(shape)
    codes, scale = quant.quantize(jnp.asarray(w), kind)
    ref_codes, ref_scale, _ = reference(w, kind)
    assert codes.dtype == {"int8": jnp.int8, "nf4": jnp.uint4}[kind]
    assert codes.shape == shape and scale.dtype == jnp.float32
    assert scale.shape == quant.scale_shape(shape, kind) == ref_scale.shape
    np.testing.assert_array_equal(np.asarray(codes, np.int32), ref_codes)
    np.testing.assert_array_equal(scale, ref_scale)


def test_scale_shapes():
    assert quant.scale_shape((128, 3), "int8") == (1, 3)
    assert quant.scale_shape((4, 100, 5), "int8") == (4, 1, 5)
    assert quant.scale_shape((128, 3), "nf4") == (2, 3)
    assert quant.scale_shape((4, 129, 5), "nf4") == (4, 3, 5)
    assert quant.scale_shape((1, 7), "nf4") == (1, 7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_round_trip_within_half_a_step(kind, shape):
    w = kernel(shape, seed=1)
    codes, scale = quant.quantize(jnp.asarray(w), kind)
    back = np.asarray(quant.dequantize(codes, scale, kind, jnp.float32))
    _, _, per_element = reference(w, kind)
    top = per_element * (127 if kind == "int8" else 1)  # the absmax of w's column (block)
    half_step = 0.5 if kind == "int8" else np.diff(PUBLISHED_NF4).max() / 2
    assert back.dtype == np.float32 and back.shape == shape
    assert np.all(np.abs(w - back) <= half_step * per_element)
    np.testing.assert_array_equal(back[w == 0], 0.0)
    # the largest |w| of a column (block) gets the end code ±127 (±1.0) and comes back as w:
    # exactly for nf4 (w / |w| = ±1), within float32's rounding of (|w| / 127) · 127 for int8
    largest = (np.abs(w) == top) & (w != 0)
    end = np.where(w > 0, 127, -127) if kind == "int8" else np.where(w > 0, 15, 0)
    np.testing.assert_array_equal(np.asarray(codes, np.int32)[largest], end[largest])
    rtol = np.finfo(np.float32).eps if kind == "int8" else 0
    np.testing.assert_allclose(back[largest], w[largest], rtol=rtol, atol=0)


@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_dequantize_computes_in_float32_then_casts(kind):
    w = jnp.asarray(kernel((70, 4), seed=2))
    codes, scale = quant.quantize(w, kind)
    back = quant.dequantize(codes, scale, kind, jnp.bfloat16)
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        back, quant.dequantize(codes, scale, kind, jnp.float32).astype(jnp.bfloat16))


@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_jit_and_vmap_over_a_layers_axis(kind):
    w = jnp.asarray(kernel((3, 100, 5), seed=3))
    codes, scale = quant.quantize(w, kind)
    q = jax.jit(jax.vmap(lambda w_IxO: quant.quantize(w_IxO, kind)))
    vcodes, vscale = q(w)
    np.testing.assert_array_equal(vcodes, codes)
    np.testing.assert_array_equal(vscale, scale)
    dq = jax.jit(jax.vmap(lambda c, s: quant.dequantize(c, s, kind, jnp.float32)))
    np.testing.assert_array_equal(dq(codes, scale),
                                  quant.dequantize(codes, scale, kind, jnp.float32))
    for i in range(3):  # a layer quantized alone equals its slice of the stacked kernel
        np.testing.assert_array_equal(quant.quantize(w[i], kind)[0], codes[i])


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int4", "fp4"])
def test_unknown_kind_is_named(kind):
    w = jnp.ones((64, 2))
    with pytest.raises(ValueError, match=repr(kind)):
        quant.quantize(w, kind)
    with pytest.raises(ValueError, match=repr(kind)):
        quant.dequantize(w.astype(jnp.int8), jnp.ones((1, 2)), kind, jnp.float32)
    with pytest.raises(ValueError, match=repr(kind)):
        quant.scale_shape((64, 2), kind)
