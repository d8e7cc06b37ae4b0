"""Encoded examples → static-shape NumPy batches, and a resumable, shardable batch iterator.

Lengths are padded up to the smallest of a few bucket lengths, so a run compiles a handful of
programs. Training sequences (prompt + completion) are right-padded; prompts that will be
generated from are left-padded. Truncation is never silent: `truncate` drops rows whose prompt
alone is too long and cuts completions to fit, and counts both.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from align_jax.data.formats import DataError
from align_jax.data.tokenize import Encoded

log = logging.getLogger(__name__)


class SequenceBatch(NamedTuple):
    """Right-padded prompt+completion sequences."""

    ids_BxT: np.ndarray  # int32, pad_id after the sequence
    attention_mask_BxT: np.ndarray  # bool, True on prompt and completion tokens
    completion_mask_BxT: np.ndarray  # bool, True on completion tokens only (where the loss goes)


class PreferenceBatch(NamedTuple):
    chosen: SequenceBatch  # chosen and rejected share one padded length
    rejected: SequenceBatch
    margin_B: np.ndarray | None = None  # the dataset's `margin` column, when it has one
    ref_chosen_logps_B: np.ndarray | None = None  # precomputed reference log-probs, when attached
    ref_rejected_logps_B: np.ndarray | None = None


class PackedPairs(NamedTuple):
    """Preference pairs packed one per row as prompt | chosen | rejected | pad, so the prompt is run
    through the model once per pair instead of twice (`Decoder.hidden_states`' segment ids).

    Completion token k of chosen (c = 0) or rejected (c = 1) is predicted by the logits at slot
    `logit_index_Bx2xC[:, c, k]`, the slot of the token before it in its own sequence; only those
    2C slots per row go through the LM head. A completion's first token has no predictor when the
    prompt is empty, as in the unpacked layout, and is masked out.
    """

    ids_BxT: np.ndarray  # int32, pad_id after the row
    attention_mask_BxT: np.ndarray  # bool, False on pads
    segment_ids_BxT: np.ndarray  # int32: 0 prompt, 1 chosen, 2 rejected (and pads)
    logit_index_Bx2xC: np.ndarray  # int32 slots whose logits predict each completion token
    labels_Bx2xC: np.ndarray  # int32 completion tokens, chosen then rejected, left-aligned
    label_mask_Bx2xC: np.ndarray  # bool, True on real completion tokens
    margin_B: np.ndarray | None = None
    ref_chosen_logps_B: np.ndarray | None = None
    ref_rejected_logps_B: np.ndarray | None = None


class UnpairedBatch(NamedTuple):
    sequences: SequenceBatch
    label_B: np.ndarray  # bool, True for desirable completions
    mismatched: SequenceBatch  # prompt i with completion i+1 (mod B): KTO's KL reference batch


class PromptBatch(NamedTuple):
    """Left-padded prompts to generate from, and the rows' `prompt` and other columns (what reward
    functions are called with)."""

    ids_BxP: np.ndarray
    mask_BxP: np.ndarray
    columns: dict[str, list]


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ length."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise DataError(f"length {length} exceeds the largest bucket {max(buckets)}")


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to, and ending with, `max_length`."""
    sizes, b = [], smallest
    while b < max_length:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (max_length,)


def _completion_keys(kind: str) -> tuple[str, ...]:
    return {"preference": ("chosen_ids", "rejected_ids"),
            "prompt_only": ()}.get(kind, ("completion_ids",))


def truncate(encoded: Encoded, max_length: int, max_prompt_length: int | None = None) -> Encoded:
    """Drop rows whose prompt exceeds `max_prompt_length` (default: leaves no room for one
    completion token in `max_length`); cut completions so prompt + completion ≤ max_length, marking
    those rows `truncated`. Counts go to `counts["dropped_long_prompts"]` and
    `counts["truncated_completions"]`."""
    keys = _completion_keys(encoded.kind)
    limit = (max_prompt_length if max_prompt_length is not None
             else (max_length - 1 if keys else max_length))
    kept, dropped, cut = [], 0, 0
    for example in encoded.examples:
        prompt = len(example["prompt_ids"])
        if prompt > limit or (keys and prompt >= max_length):
            dropped += 1
            continue
        example = dict(example, truncated=False)
        for key in keys:
            if prompt + len(example[key]) > max_length:
                example[key] = example[key][: max_length - prompt]
                example["truncated"] = True
        cut += example["truncated"]
        kept.append(example)
    if not kept:
        raise DataError(f"{encoded.source}: every one of {len(encoded.examples)} rows has a prompt "
                        f"longer than {limit} tokens")
    for what, n in (("dropped (prompt too long)", dropped), ("with a truncated completion", cut)):
        if n:
            log.warning("%s: %d of %d rows %s at max_length=%d", encoded.source, n,
                        len(encoded.examples), what, max_length)
    counts = dict(encoded.counts, dropped_long_prompts=dropped, truncated_completions=cut)
    return dataclasses.replace(encoded, examples=kept, counts=counts)


def _sequences(prompts: list[list[int]], completions: list[list[int]], width: int,
               pad_id: int) -> SequenceBatch:
    B = len(prompts)
    ids, attention, completion = (np.full((B, width), pad_id, np.int32), np.zeros((B, width), bool),
                                  np.zeros((B, width), bool))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = p + c
        attention[i, : len(p) + len(c)] = True
        completion[i, len(p): len(p) + len(c)] = True
    return SequenceBatch(ids, attention, completion)


def _packed_pairs(prompts, chosen, rejected, width: int, completion_width: int,
                  pad_id: int) -> tuple[np.ndarray, ...]:
    """The six arrays of `PackedPairs`, up to its optional columns."""
    B, C = len(prompts), completion_width
    ids, mask, segments = (np.full((B, width), pad_id, np.int32), np.zeros((B, width), bool),
                           np.zeros((B, width), np.int32))
    index, labels, label_mask = (np.zeros((B, 2, C), np.int32), np.zeros((B, 2, C), np.int32),
                                 np.zeros((B, 2, C), bool))
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        row = p + c + r
        ids[i, : len(row)], mask[i, : len(row)] = row, True
        segments[i, len(p): len(p) + len(c)], segments[i, len(p) + len(c): len(row)] = 1, 2
        for side, (start, completion) in enumerate(((len(p), c), (len(p) + len(c), r))):
            predictors = np.array(
                [len(p) - 1, *range(start, start + len(completion) - 1)][: len(completion)])
            real = predictors >= 0
            index[i, side, : len(completion)] = np.maximum(predictors, 0)
            labels[i, side, : len(completion)], label_mask[i, side, : len(completion)] = (
                completion, real)
    return ids, mask, segments, index, labels, label_mask


def bucket_width(examples: list[dict[str, Any]], kind: str, buckets: Sequence[int],
                 share_prompt: bool = False) -> int | tuple[int, int]:
    """The smallest bucket that fits every row: its prompt plus its (longest) completion.

    With `share_prompt` (preference pairs packed as `PackedPairs`): (T, C), where C is the smallest
    bucket that fits every completion and T = width + C fits prompt + chosen + rejected.
    """
    keys = _completion_keys(kind)
    width = bucket(max(len(e["prompt_ids"]) + max((len(e[k]) for k in keys), default=0)
                       for e in examples), buckets)
    if not share_prompt:
        return width
    completion_width = bucket(max(len(e[k]) for e in examples for k in keys), buckets)
    return width + completion_width, completion_width


def collate(examples: list[dict[str, Any]], kind: str, buckets: Sequence[int], pad_id: int,
            width: int | tuple[int, int] | None = None, share_prompt: bool = False):
    """One batch of the kind's type, padded to `width`, by default the smallest bucket that fits its
    longest row (with several processes, the global batch's longest row, so all shapes agree).
    `share_prompt` packs preference pairs as `PackedPairs` (`width` is then bucket_width's
    (T, C))."""
    if share_prompt and kind != "preference":
        raise ValueError(f"share_prompt packs preference pairs, not {kind} rows")
    width = width or bucket_width(examples, kind, buckets, share_prompt)
    prompts = [e["prompt_ids"] for e in examples]
    if kind == "prompt_only":
        ids, mask = (np.full((len(prompts), width), pad_id, np.int32),
                     np.zeros((len(prompts), width), bool))
        for i, p in enumerate(prompts):
            if p:
                ids[i, -len(p):], mask[i, -len(p):] = p, True
        other = [k for k in examples[0] if k not in ("prompt_ids", "truncated")]
        return PromptBatch(ids, mask, {k: [e[k] for e in examples] for k in other})
    if kind == "preference":
        chosen, rejected = ([e["chosen_ids"] for e in examples],
                            [e["rejected_ids"] for e in examples])
        column = {k: np.array([e[k] for e in examples], np.float32) if k in examples[0] else None
                  for k in ("margin", "ref_chosen_logps", "ref_rejected_logps")}
        columns = column["margin"], column["ref_chosen_logps"], column["ref_rejected_logps"]
        if share_prompt:
            return PackedPairs(*_packed_pairs(prompts, chosen, rejected, *width, pad_id), *columns)
        return PreferenceBatch(_sequences(prompts, chosen, width, pad_id),
                               _sequences(prompts, rejected, width, pad_id), *columns)
    completions = [e["completion_ids"] for e in examples]
    if kind == "unpaired_preference":
        shifted = completions[1:] + completions[:1]
        return UnpairedBatch(_sequences(prompts, completions, width, pad_id),
                             np.array([e["label"] for e in examples], bool),
                             _sequences(prompts,
                                        [s[: width - len(p)] for p, s in zip(prompts, shifted)],
                                        width, pad_id))
    return _sequences(prompts, completions, width, pad_id)


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Where an iterator is: the epoch and the number of batches already taken from it.
    Save `dataclasses.asdict(state)` in a checkpoint; `LoaderState(**saved)` resumes."""

    epoch: int = 0
    step: int = 0


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batches(encoded: Encoded, *, batch_size: int, seed: int, pad_id: int, buckets: Sequence[int],
            state: LoaderState = LoaderState(), epochs: int | None = None, process_index: int = 0,
            process_count: int = 1, share_prompt: bool = False
            ) -> Iterator[tuple[LoaderState, Any]]:
    """Yield (state after this batch, host-local batch) forever, or for `epochs` epochs.

    Each epoch visits the rows in `epoch_order`, in global batches of `batch_size` rows (the last,
    incomplete one is left out so shapes stay static); process i of n (`process_index`,
    `process_count`) takes rows [i·batch_size/n, (i+1)·batch_size/n) of each global batch.
    Starting from a saved state yields exactly the batches that would have followed it.
    """
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} is not divisible by the {process_count} "
                        f"processes")
    n = len(encoded.examples)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"{encoded.source}: {n} rows cannot fill one batch of {batch_size}")
    local = batch_size // process_count
    epoch, step = state.epoch, state.step
    while epochs is None or epoch < epochs:
        order = epoch_order(n, seed, epoch)
        while step < per_epoch:
            global_rows = [encoded.examples[i]
                           for i in order[step * batch_size:(step + 1) * batch_size]]
            width = bucket_width(global_rows, encoded.kind, buckets, share_prompt)
            step += 1
            mine = global_rows[process_index * local:(process_index + 1) * local]
            yield LoaderState(epoch, step), collate(mine, encoded.kind, buckets, pad_id, width,
                                                    share_prompt)
        epoch, step = epoch + 1, 0
