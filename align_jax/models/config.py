"""DecoderConfig: one dataclass for the Llama family, built from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a decoder-only transformer (Llama 2/3, Mistral, SmolLM, Qwen2/2.5/3)."""

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
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1: attend to the last `sliding_window` keys
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} unsupported; "
                             f"expected {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | Any, *, source: str = "config") -> "DecoderConfig":
        """From a transformers config (object or config.json dict); unsupported features are errors.

        `source` names the file or object in error messages.
        """
        hf = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = hf.get("model_type")
        where = f"{source}: model_type={model_type!r}"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where} is not supported; "
                             f"align_jax supports {SUPPORTED_MODEL_TYPES}")
        act = hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act={act!r} is not supported "
                             f"(only SwiGLU with silu)")
        if hf.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias=True is not supported")
        if model_type == "llama" and hf.get("attention_bias"):
            raise ValueError(f"{where}: attention_bias=True on llama is not supported")
        try:
            rope = _rope_fields(hf.get("rope_scaling") or hf.get("rope_parameters"), where)
            num_heads = hf["num_attention_heads"]
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2",
                qk_norm=model_type == "qwen3",
                sliding_window=_sliding_window(hf, model_type),
                model_type=model_type,
                **rope,
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers loads into the matching architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        out = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        }
        if self.rope_type == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            out["rope_scaling"] = {
                "rope_type": "llama3", "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position,
            }
        if self.model_type == "llama":
            out["attention_bias"] = False
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            out["sliding_window"] = self.sliding_window
            if self.model_type != "mistral":
                out["use_sliding_window"] = self.sliding_window is not None
        return out


def _rope_theta(hf):
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _rope_fields(scaling: dict | None, where: str) -> dict[str, Any]:
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


def _sliding_window(hf, model_type):
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(f"model_type={model_type!r}: use_sliding_window=True (per-layer windows) "
                         "is not supported")
    return None
