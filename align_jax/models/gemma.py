"""Gemma 2 and Gemma 3 (text), as transformers' Gemma2ForCausalLM and Gemma3ForCausalLM.

Their blocks differ from the Llama family's (`models.llama`) in:
  * RMSNorm weights w act as (1 + w), multiplied in float32 before the cast back;
  * token embeddings × √D (in the compute dtype);
  * "sandwich" norms: x + RMSNorm(Attn(RMSNorm(x))), then x + RMSNorm(MLP(RMSNorm(x)));
  * GeGLU: down(gelu_tanh(gate(x)) · up(x));
  * scores q·k × query_pre_attn_scalar^-1/2; Gemma 2 soft-caps them, s ← 50·tanh(s / 50), and the
    final logits, z ← 30·tanh(z / 30);
  * sliding-window and global layers alternating, `layer_types` (Gemma 2: every other layer;
    Gemma 3: five windowed, then one global); Gemma 3's windowed layers take their own RoPE base
    (10⁴, unscaled) and its global ones the scaled 10⁶; Gemma 3 has q/k RMSNorm.
"""

from __future__ import annotations

from typing import Any

from align_jax.models.config import DecoderConfig, rope_fields, rope_theta
from align_jax.models.llama import attention_names, mlp_names

ARCHITECTURES = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", False),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", False),
}
PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global when layer_types is absent


def fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """DecoderConfig fields beyond `config.common_fields`; unsupported features are errors."""
    model_type = hf["model_type"]
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: hidden_activation={act!r} is not supported (only GeGLU with "
                         "gelu_pytorch_tanh)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise ValueError(f"{where}: {key}=True is not supported")
    period = hf.get("sliding_window_pattern", PATTERN[model_type])
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(hf["num_hidden_layers"])]
    out = dict(
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_act=act, norm_unit_offset=True, sandwich_norm=True, embed_scale=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
    if model_type == "gemma3_text":
        out.update(qk_norm=True, **_gemma3_rope(hf, where))
    return out


def _gemma3_rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Global and local RoPE: transformers 5 writes `rope_parameters` per layer type; config.json
    files on the Hub have rope_scaling, rope_theta and rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
    if rope_fields(local, where):
        raise ValueError(f"{where}: scaled RoPE on the sliding-window layers is not supported")
    return dict(rope_theta=rope_theta(full, hf, 1e6), **rope_fields(full, where),
                rope_local_theta=float(local.get("rope_theta", 1e4)))


def hf_fields(config: DecoderConfig) -> dict[str, Any]:
    """config.json entries beyond `config.common_hf`."""
    out = {
        "hidden_activation": config.hidden_act,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
        "attention_bias": False,
    }
    if config.model_type == "gemma3_text":
        out["rope_local_base_freq"] = config.rope_local_theta
    return out


def block_names(config: DecoderConfig):
    """Every tensor of a block, in transformers' order: (HF name in a block, our path in a block,
    transposed)."""
    yield from attention_names(config)
    yield from mlp_names(config)
    for hf, ours in (("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "attn_out_norm"),
                     ("pre_feedforward_layernorm", "mlp_norm"),
                     ("post_feedforward_layernorm", "mlp_out_norm")):
        yield f"{hf}.weight", (ours, "weight"), False
