"""Datasets in TRL's formats → validated, tokenized, static-shape batches; synthetic tasks."""

from align_jax.data.batching import (
    LoaderState,
    PreferenceBatch,
    PromptBatch,
    SequenceBatch,
    UnpairedBatch,
    batches,
    bucket,
    collate,
    default_buckets,
    row_length,
    truncate,
)
from align_jax.data.formats import DataError, detect_kind, extract_prompt, load_rows, validate
from align_jax.data.tokenize import Encoded, encode

__all__ = [
    "DataError",
    "Encoded",
    "LoaderState",
    "PreferenceBatch",
    "PromptBatch",
    "SequenceBatch",
    "UnpairedBatch",
    "batches",
    "bucket",
    "collate",
    "default_buckets",
    "detect_kind",
    "encode",
    "extract_prompt",
    "load_rows",
    "row_length",
    "truncate",
    "validate",
]
