"""Mixture-of-experts families: Mixtral and Qwen3-MoE, as transformers' MixtralForCausalLM and
Qwen3MoeForCausalLM.

Their blocks are the Llama family's (`models.llama`; Qwen3-MoE with Qwen3's q/k RMSNorm) with the
MLP replaced by a sparse mixture of experts (`models.moe`): a router over E experts, the top k per
token, weights renormalised (Mixtral always, Qwen3-MoE when `norm_topk_prob`). Checkpoints store
each expert's projections separately; loading stacks them into one [E, …] weight per projection
and saving splits it again, under transformers' names.
"""

from __future__ import annotations

from typing import Any

from align_jax.models.config import DecoderConfig
from align_jax.models.llama import attention_names

ARCHITECTURES = {
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification", False),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification", False),
}
# model_type -> (HF prefix of the MoE block inside a layer, its experts' (gate, up, down) names)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """DecoderConfig fields beyond `config.common_fields`; unsupported features are errors."""
    model_type = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only SwiGLU with silu)")
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not num_experts:
        raise ValueError(f"{where}: num_experts=0 (a dense model) is not supported")
    refused = {"router_jitter_noise": bool(hf.get("router_jitter_noise")),
               "attention_bias": bool(hf.get("attention_bias")),
               "use_sliding_window": bool(hf.get("use_sliding_window")),
               "mlp_only_layers (dense layers between MoE ones)": bool(hf.get("mlp_only_layers")),
               "decoder_sparse_step != 1 (dense layers between MoE ones)":
                   hf.get("decoder_sparse_step", 1) != 1,
               "shared experts": bool(hf.get("shared_expert_intermediate_size"))}
    for feature, present in refused.items():
        if present:
            raise ValueError(f"{where}: {feature} is not supported")
    out = dict(tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
               num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
               router_aux_loss_coef=_aux_coef(hf))
    if model_type == "mixtral":
        return dict(out, moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
                    sliding_window=hf.get("sliding_window"))
    return dict(out, moe_intermediate_size=hf["moe_intermediate_size"], qk_norm=True,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


def _aux_coef(hf: dict[str, Any]) -> float:
    """The load-balancing loss's weight in training: `router_aux_loss_coef` when
    `output_router_logits` is set, else 0 (as transformers and TRL add it)."""
    return float(hf.get("router_aux_loss_coef", 0.001)) if hf.get("output_router_logits") else 0.0


def hf_fields(config: DecoderConfig) -> dict[str, Any]:
    """config.json entries beyond `config.common_hf`."""
    out = {"num_experts_per_tok": config.num_experts_per_tok,
           "router_aux_loss_coef": config.router_aux_loss_coef,
           "output_router_logits": config.router_aux_loss_coef > 0}
    if config.model_type == "mixtral":
        return dict(out, num_local_experts=config.num_experts,
                    sliding_window=config.sliding_window, router_jitter_noise=0.0)
    return dict(out, num_experts=config.num_experts,
                moe_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                sliding_window=None, use_sliding_window=False, attention_bias=False)


def block_names(config: DecoderConfig):
    """Every tensor of a block: (HF name in a block, our path in a block, transposed[, expert])."""
    yield from attention_names(config)
    block, (gate, up, down) = EXPERT_NAMES[config.model_type]
    yield f"{block}.gate.weight", ("mlp", "router"), True
    for e in range(config.num_experts):
        for hf, ours in ((gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")):
            yield f"{block}.experts.{e}.{hf}.weight", ("mlp", ours), True, e
    yield "input_layernorm.weight", ("attn_norm", "weight"), False
    yield "post_attention_layernorm.weight", ("mlp_norm", "weight"), False


def unfuse(tensors: dict[str, Any], config: DecoderConfig) -> dict[str, Any]:
    """A transformers model's `state_dict()` under the checkpoint's per-expert names: in memory,
    transformers 5 holds each layer's experts fused, `mlp.experts.gate_up_proj` [E, 2I, D] (gate
    rows first) and `mlp.experts.down_proj` [E, D, I], and Mixtral's block under `mlp.`."""
    block, (gate, up, down) = EXPERT_NAMES[config.model_type]
    out = {}
    for name, array in tensors.items():
        prefix, _, kind = name.partition(".mlp.experts.")
        if kind == "gate_up_proj":
            width = array.shape[1] // 2
            for e in range(array.shape[0]):
                out[f"{prefix}.{block}.experts.{e}.{gate}.weight"] = array[e, :width]
                out[f"{prefix}.{block}.experts.{e}.{up}.weight"] = array[e, width:]
        elif kind == "down_proj":
            for e in range(array.shape[0]):
                out[f"{prefix}.{block}.experts.{e}.{down}.weight"] = array[e]
        else:
            out[name.replace(".mlp.gate.", f".{block}.gate.")] = array
    return out
