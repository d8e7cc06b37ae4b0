"""DecoderConfig: the hyperparameters of every supported decoder, and the config.json fields that
all families share. Each family (`models.llama`, `models.gemma`) reads and writes its own fields;
`models.registry` maps a config.json's `model_type` to its family."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU (Llama) and GeGLU with tanh GELU (Gemma)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a decoder-only transformer (Llama 2/3, Mistral, SmolLM, Qwen2/2.5/3,
    Gemma 2, Gemma 3, Mixtral, Qwen3-MoE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear and llama3 scaling
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3 only
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v (not o)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # a windowed layer attends to the last `sliding_window` keys
    # which layers are windowed, "sliding_attention" | "full_attention" per layer (Gemma 2, 3);
    # None: every layer is windowed when `sliding_window` is set (Mistral v0.1)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: the windowed layers' RoPE base (unscaled)
    hidden_act: str = "silu"  # the MLP's gate activation, one of ACTIVATIONS
    norm_unit_offset: bool = False  # Gemma: RMSNorm weights w act as (1 + w), applied in float32
    sandwich_norm: bool = False  # Gemma 2, 3: RMSNorm on the attention's and the MLP's outputs too
    embed_scale: bool = False  # Gemma: token embeddings × √hidden_size
    query_pre_attn_scalar: float | None = None  # Gemma: scores × this^-1/2 (default head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores ← c·tanh(scores / c)
    final_logit_softcap: float | None = None  # Gemma 2: logits ← c·tanh(logits / c)
    num_experts: int = 0  # Mixtral, Qwen3-MoE: every block's MLP is this many experts (0: dense)
    num_experts_per_tok: int = 0  # k: the experts each token goes to
    moe_intermediate_size: int = 0  # an expert's width
    norm_topk_prob: bool = True  # renormalise the k router probabilities to sum to 1
    # the load-balancing loss's weight in training: the checkpoint's router_aux_loss_coef when its
    # output_router_logits is set (as transformers and TRL add it), else 0
    router_aux_loss_coef: float = 0.0
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} unsupported; "
                             f"expected {SUPPORTED_ROPE_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; "
                             f"expected one of {ACTIVATIONS}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if len(self.layer_types) != self.num_layers or unknown:
                raise ValueError(f"layer_types={list(self.layer_types)}: expected one of "
                                 f"{LAYER_TYPES} for each of the {self.num_layers} layers")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window "
                                 "is not set")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}: expected 1 to "
                             f"num_experts={self.num_experts}")

    @property
    def attention_scale(self) -> float:
        """The factor on q·k: query_pre_attn_scalar^-1/2 (Gemma), else head_dim^-1/2."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def windowed_layers(self) -> tuple[bool, ...]:
        """Whether each layer attends within `sliding_window`."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)


def common_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The DecoderConfig fields every family reads the same way from config.json."""
    num_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=rope_theta(hf.get("rope_parameters"), hf),
        **rope_fields(hf.get("rope_scaling") or hf.get("rope_parameters"), where),
    )


def common_hf(config: DecoderConfig) -> dict[str, Any]:
    """The config.json entries every family writes the same way."""
    out = {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "float32",
    }
    if config.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position,
        }
    return out


def rope_theta(params: dict | None, hf: dict[str, Any], default: float = 10_000.0) -> float:
    """The RoPE base: `rope_parameters.rope_theta` (transformers 5) or `rope_theta`."""
    return float((params or {}).get("rope_theta", hf.get("rope_theta", default)))


def rope_fields(scaling: dict | None, where: str) -> dict[str, Any]:
    """DecoderConfig's rope_type and its factors from `rope_scaling` / `rope_parameters`."""
    if not scaling:
        return {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        return {"rope_type": "linear", "rope_factor": float(scaling["factor"])}
    if rope_type == "llama3":
        return {
            "rope_type": "llama3",
            "rope_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_position": int(scaling["original_max_position_embeddings"]),
        }
    raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported; "
                     f"supported: {SUPPORTED_ROPE_TYPES}")
