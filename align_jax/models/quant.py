"""Storage of a frozen base model's projection kernels for QLoRA: quantized codes and their scales,
dequantized to the compute dtype right before each matmul.

A kernel is laid out [..., I, O] (I inputs, O outputs, any leading axes such as a stacked L axis);
Z = ⌈I / NF4_BLOCK⌉ is the number of nf4 blocks of a column.

  int8  symmetric absmax per output column: s_o = max_i |w_io| / 127,  q_io = round(w_io / s_o)
  nf4   NormalFloat4 (Dettmers et al. 2023, "QLoRA", §3): per block b of NF4_BLOCK consecutive
        inputs of one column, a_bo = max_{i∈b} |w_io|,  q_io = argmin_k |NF4_CODE[k] - w_io / a_bo|

A column or block that is all zero gets scale 1, so its codes are those of 0 and come back as 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")  # what model.lora.base_dtype may say
QUANTIZED = ("int8", "nf4")
NF4_BLOCK = 64

# The 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Appendix E;
# bitsandbytes' NF4 table).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# Decision boundaries: w / a_bo goes to code k when it lies in (MID[k-1], MID[k]].
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _check(kind: str):
    if kind not in QUANTIZED:
        raise ValueError(f"quantization kind {kind!r} is not one of {QUANTIZED}")


def scale_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The shape of `quantize`'s scale for a kernel of `shape` [..., I, O]: [..., 1, O] (int8) or
    [..., Z, O] with Z = ⌈I / NF4_BLOCK⌉ (nf4)."""
    _check(kind)
    *lead, n_in, n_out = shape
    return (*lead, 1 if kind == "int8" else math.ceil(n_in / NF4_BLOCK), n_out)


def _scale(w: jax.Array, levels: int) -> jax.Array:
    """max |w| over axis -2 (kept) / levels; 1 where w is all zero along that axis."""
    a = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    return jnp.where(a == 0, 1.0, a / levels)


def quantize(kernel_IxO: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) of a kernel [..., I, O].

    int8: scale [..., 1, O] float32, s_o = max_i |w_io| / 127 (1 where a column is all zero);
      codes int8 [..., I, O], q_io = round(w_io / s_o) ∈ [-127, 127].
    nf4: blocks of NF4_BLOCK consecutive inputs of one column (bitsandbytes' blocks of the [O, I]
      torch weight; the last block is shorter when NF4_BLOCK ∤ I): scale = absmax [..., Z, O]
      float32, a_bo = max_{i∈b} |w_io| (1 where a block is all zero); codes jnp.uint4 [..., I, O],
      q_io = argmin_k |NF4_CODE[k] - w_io / a_bo| (QLoRA, Dettmers et al. 2023).
    """
    _check(kind)
    w_IxO = kernel_IxO.astype(jnp.float32)
    if kind == "int8":
        scale_1xO = _scale(w_IxO, 127)
        codes_IxO = jnp.clip(jnp.round(w_IxO / scale_1xO), -127, 127)
        return codes_IxO.astype(jnp.int8), scale_1xO
    *lead, n_in, n_out = w_IxO.shape
    n_blocks = math.ceil(n_in / NF4_BLOCK)
    pad = [(0, 0)] * len(lead) + [(0, n_blocks * NF4_BLOCK - n_in), (0, 0)]  # zeros: absmax-neutral
    w_blocks = jnp.pad(w_IxO, pad).reshape(*lead, n_blocks, NF4_BLOCK, n_out)
    absmax_Zx1xO = _scale(w_blocks, 1)
    codes_blocks = jnp.searchsorted(jnp.asarray(_NF4_MID), w_blocks / absmax_Zx1xO)
    codes_IxO = codes_blocks.reshape(*lead, n_blocks * NF4_BLOCK, n_out)[..., :n_in, :]
    return codes_IxO.astype(jnp.uint4), absmax_Zx1xO[..., 0, :]


def dequantize(codes: jax.Array, scale: jax.Array, kind: str, dtype) -> jax.Array:
    """The kernel [..., I, O] in `dtype`, computed in float32 then cast:
    w_io = q_io · s_o (int8) or w_io = NF4_CODE[q_io] · a_bo of its block b (nf4)."""
    _check(kind)
    if kind == "int8":
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    n_in = codes.shape[-2]
    absmax_IxO = jnp.repeat(scale, NF4_BLOCK, axis=-2)[..., :n_in, :]
    values_IxO = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
    return (values_IxO * absmax_IxO).astype(dtype)
