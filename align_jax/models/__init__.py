"""Flax NNX decoder for the Llama family, KV cache, and Hugging Face checkpoint I/O."""

from align_jax.models.config import SUPPORTED_MODEL_TYPES, DecoderConfig
from align_jax.models.decoder import Decoder, KVCache, init_cache
from align_jax.models.hf import (
    from_tensors,
    load_pretrained,
    read_config,
    save_pretrained,
    to_tensors,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "from_tensors",
    "init_cache",
    "load_pretrained",
    "read_config",
    "save_pretrained",
    "to_tensors",
]
