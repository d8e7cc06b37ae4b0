"""Datasets in TRL's formats → validated, tokenized, static-shape batches; synthetic tasks."""

from align_jax.data.batching import (
    LoaderState,
    PackedPairs,
    PreferenceBatch,
    PromptBatch,
    SequenceBatch,
    UnpairedBatch,
    batches,
    bucket,
    bucket_width,
    collate,
    default_buckets,
    truncate,
)
from align_jax.data.formats import (
    DataError,
    detect_kind,
    extract_prompt,
    load_rows,
    unpair,
    validate,
)
from align_jax.data.tokenize import Encoded, encode

__all__ = [
    "DataError",
    "Encoded",
    "LoaderState",
    "PackedPairs",
    "PreferenceBatch",
    "PromptBatch",
    "SequenceBatch",
    "UnpairedBatch",
    "batches",
    "bucket",
    "bucket_width",
    "collate",
    "default_buckets",
    "detect_kind",
    "encode",
    "extract_prompt",
    "load_rows",
    "truncate",
    "unpair",
    "validate",
]
