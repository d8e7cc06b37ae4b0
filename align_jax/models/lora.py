"""Dense layers with an optional LoRA adapter and an optionally quantized frozen kernel.

    y = x·W + b + s · (dropout(x)·A)·B,    A [I, R], B [R, O], s = α / R (α / √R: rsLoRA)

(Hu et al. 2021, "LoRA"; Kalajdzievski 2023, "rsLoRA"). A starts uniform in ±1/√I and B at zero,
as PEFT initialises them, so a new adapter leaves the model as it was. A and B are
`nnx.LoRAParam`s, which is how the trainer tells them from the frozen base (`TRAINABLE`). W may be
stored as int8 or NF4 codes with their scales (`models.quant`, QLoRA: Dettmers et al. 2023),
dequantised to the compute dtype for each product.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.config import LoRAConfig
from align_jax.models.quant import dequantize, quantize

# Every projection of a block, by PEFT's `target_modules` names: what LoRA may target and QLoRA
# quantizes.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What a LoRA run trains: the adapters, and the scalar head of a reward model or critic (PEFT's
# `modules_to_save` for sequence classification).
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("score_head"))


def lora_scale(cfg: LoRAConfig) -> float:
    """s = α / R, or α / √R with rsLoRA."""
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


class Linear(nnx.Module):
    """x·W + b in the compute dtype, plus a LoRA adapter when `lora` is given (see the module
    docstring); `quant` ("int8" | "nf4") stores W as codes and scales. Without either it is
    `nnx.Linear` (same parameters, initialisation and product)."""

    def __init__(self, d_in: int, d_out: int, names: tuple, *, rngs: nnx.Rngs, dtype,
                 param_dtype, bias: bool = False, quant: str | None = None,
                 lora: LoRAConfig | None = None):
        self.dtype, self.quant = dtype, quant
        key = rngs.params()
        kernel = nnx.initializers.normal(0.02)(key, (d_in, d_out), param_dtype)
        if quant is None:
            self.kernel = nnx.Param(kernel, out_sharding=names)
        else:  # placeholders of the right types: the base's weights are quantized into them
            codes, scale = quantize(kernel, quant)
            self.kernel = nnx.Param(codes, out_sharding=names)
            # int8's scales are one row per kernel; nf4's absmax one row per block of inputs
            scale_names = (names[0] if quant == "nf4" else None, names[1])
            self.kernel_scale = nnx.Param(scale, out_sharding=scale_names)
        if bias:
            rngs.params()  # as nnx.Linear, which draws a key for its (zero) bias
            self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), out_sharding=names[1:])
        else:
            self.bias = nnx.data(None)
        self.lora_scale = self.lora_dropout = None
        if lora is not None:
            bound = 1 / math.sqrt(d_in)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(
                jax.random.fold_in(key, 1), (d_in, lora.rank), param_dtype, -bound, bound),
                out_sharding=(names[0], None))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, d_out), param_dtype),
                                        out_sharding=(None, names[1]))
            self.lora_scale, self.lora_dropout = lora_scale(lora), lora.dropout

    def weight(self) -> jax.Array:
        """W [I, O] in the compute dtype."""
        if self.quant is None:
            return self.kernel[...].astype(self.dtype)
        return dequantize(self.kernel[...], self.kernel_scale[...], self.quant, self.dtype)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(x, self.weight(), (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_scale is None:
            return y
        h = x
        if dropout_key is not None and self.lora_dropout:
            keep = jax.random.bernoulli(dropout_key, 1 - self.lora_dropout, x.shape)
            h = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(self.dtype)
        # s scales the [rows, R] product, not the [rows, O] one: a small array, no extra
        # [rows, O] buffer to keep for the backward pass
        low = (h @ self.lora_a[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y + low @ self.lora_b[...].astype(self.dtype)


def set_dropout_key(model: nnx.Module, key: jax.Array | None) -> None:
    """Training forward passes of every decoder in `model` draw their adapters' dropout masks from
    `key` (None: no dropout, as in evaluation, reference and sampling passes)."""
    for _, module in nnx.iter_graph(model):
        if hasattr(module, "lora_dropout_key"):
            module.lora_dropout_key = key
