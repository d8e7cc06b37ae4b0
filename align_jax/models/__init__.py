"""A Flax NNX decoder for the Llama and Gemma families (`registry`), its KV cache, and Hugging Face
checkpoint I/O."""

from align_jax.models.config import DecoderConfig
from align_jax.models.decoder import Decoder, KVCache, init_cache
from align_jax.models.hf import (
    from_tensors,
    load_pretrained,
    read_config,
    save_pretrained,
    to_tensors,
)
from align_jax.models.registry import FAMILIES, config_from_hf, config_to_hf

__all__ = [
    "FAMILIES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "config_from_hf",
    "config_to_hf",
    "from_tensors",
    "init_cache",
    "load_pretrained",
    "read_config",
    "save_pretrained",
    "to_tensors",
]
