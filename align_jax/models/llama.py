"""The Llama family as transformers names it: Llama 2/3 (SmolLM), Mistral, Qwen2/2.5 and Qwen3.

Pre-norm blocks x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), with RoPE and grouped-query
attention; Qwen2 adds q/k/v biases, Qwen3 q/k RMSNorm, Mistral v0.1 a sliding window.
"""

from __future__ import annotations

from typing import Any

from align_jax.models.config import DecoderConfig

# model_type -> (language model class, sequence classifier class, whether GGUF files load)
ARCHITECTURES = {t: (f"{a}ForCausalLM", f"{a}ForSequenceClassification", True)
                 for t, a in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"),
                              ("qwen3", "Qwen3"))}


def fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """DecoderConfig fields beyond `config.common_fields`; unsupported features are errors."""
    model_type = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only SwiGLU with silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=True is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=True on llama is not supported")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=True (per-layer windows) is not supported")
    return dict(
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
    )


def hf_fields(config: DecoderConfig) -> dict[str, Any]:
    """config.json entries beyond `config.common_hf`."""
    if config.model_type == "llama":
        return {"attention_bias": False}
    if config.model_type == "mistral":
        return {"sliding_window": config.sliding_window}
    return {"sliding_window": None, "use_sliding_window": False}


def attention_names(config: DecoderConfig):
    """The attention's tensors: (HF name in a block, our path in a block, transposed)."""
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), True
        if config.attention_bias and proj != "o_proj":
            yield f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), False
    if config.qk_norm:
        for norm in ("q_norm", "k_norm"):
            yield f"self_attn.{norm}.weight", ("self_attn", norm, "weight"), False


def mlp_names(config: DecoderConfig):
    """The gated MLP's tensors, as `attention_names`."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield f"mlp.{proj}.weight", ("mlp", proj, "kernel"), True


def block_names(config: DecoderConfig):
    """Every tensor of a block, in transformers' order, as `attention_names`."""
    yield from attention_names(config)
    yield from mlp_names(config)
    yield "input_layernorm.weight", ("attn_norm", "weight"), False
    yield "post_attention_layernorm.weight", ("mlp_norm", "weight"), False
