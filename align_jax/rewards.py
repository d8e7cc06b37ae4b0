"""Reward functions for online RL, with TRL's signature, and how several combine into one reward.

A reward function is called with keywords, `f(prompts=…, completions=…, completion_ids=…,
**columns) -> list[float | None]`, where `columns` are the prompt dataset's other columns (e.g.
`answer`) repeated for each completion, and a completion is text or a list of messages whose last
holds the text (as in TRL). `None` means "no opinion on this sample": it is left out of that
function's term and of its metrics, never counted as zero.

- `accuracy`: the extracted final answer equals the `answer` column, compared as numbers when
  both parse (integers, decimals, fractions, `\\frac{a}{b}`, thousands separators).
- `think_format`: the completion is exactly `<think>…</think><answer>…</answer>` (DeepSeek-R1).
- `soft_overlong_punishment`: DAPO's length penalty (Yu et al. 2025, eq. 13).
- `reward_model_reward`: a trained reward model (`align-jax train` with method `reward`) as one.
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

RewardFn = Callable[..., Sequence]

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)
_HASHES = re.compile(r"####\s*([^\n]+)")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{…}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last <answer>…</answer>, else the last \\boxed{…},
    else what follows a GSM8K-style `####`; None when there is none (a bare number is not taken
    as an answer, so the format has to be followed)."""
    tagged = _TAGGED.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else None


def parse_number(text: str) -> Fraction | None:
    """An exact number from '42', '-3.5', '1,000', '3/4', '\\frac{3}{4}', '$12$'; None otherwise."""
    text = _FRAC.sub(r"\1/\2", text.strip().strip("$").replace("\\!", "").replace(" ", ""))
    text = text.removesuffix(".")
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, truth) -> bool:
    """Numeric equality when both sides parse as numbers, else equality of the stripped strings."""
    truth_text = str(truth).strip()
    a, b = parse_number(predicted), parse_number(truth_text)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == truth_text


def accuracy(completions: Sequence, answer: Sequence, **_) -> list[float | None]:
    """1 where the completion's extracted answer matches `answer`, 0 where it does not or there is
    none, None where the row has no answer to compare with."""
    out = []
    for completion, truth in zip(completions, answer):
        if truth is None:
            out.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        out.append(float(predicted is not None and answers_match(predicted, truth)))
    return out


def think_format(completions: Sequence, **_) -> list[float]:
    """1 where the completion is exactly <think>…</think><answer>…</answer>, else 0."""
    return [float(_FORMAT.match(completion_text(c).strip()) is not None) for c in completions]


def soft_overlong_punishment(max_completion_length: int, cache_length: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max the generation limit:
    0 for |y| ≤ L_max − L_cache, then falling linearly to −1 at L_max, and −1 beyond."""
    if not 0 < cache_length <= max_completion_length:
        raise ValueError(f"soft overlong cache {cache_length} must be in "
                         f"(0, {max_completion_length}]")
    free = max_completion_length - cache_length

    def soft_overlong(completion_ids: Sequence[Sequence[int]], **_) -> list[float]:
        return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / cache_length)
                for ids in completion_ids]

    return soft_overlong


def reward_model_reward(score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        render: Callable[[Any, Any], Sequence[int]], pad_id: int, *,
                        batch_size: int = 32) -> RewardFn:
    """A reward model as a reward function: each prompt + completion rendered to token ids as the
    model was trained (`render`, e.g. `data.tokenize.render_pair`: chat template for messages,
    else the texts joined with EOS appended), right-padded with `pad_id` in batches, and
    `score_fn(ids_BxT, mask_BxT)` (e.g. a jitted `Decoder.score`) at the last token."""

    def reward_model(prompts: Sequence, completions: Sequence, **_) -> list[float]:
        rows = [render(p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
            width = max(len(r) for r in chunk)
            ids = np.full((batch_size, width), pad_id, np.int32)
            mask = np.zeros((batch_size, width), bool)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = r, True
            scores.extend(np.asarray(score_fn(ids, mask)).tolist())
        return scores[:len(rows)]

    return reward_model


def resolve(name: str, builtin: dict[str, Callable], what: str = "reward function") -> Callable:
    """A built-in reward function (or other `what`) by name, or any function as
    'package.module:function'."""
    if name in builtin:
        return builtin[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{what} {name!r}: {e}") from None
    raise ValueError(f"unknown {what} {name!r}: use one of {sorted(builtin)} "
                     f"or 'module:function'")


def score(funcs: dict[str, RewardFn], weights: Sequence[float], *, prompts: Sequence,
          completions: Sequence, completion_ids: Sequence[Sequence[int]],
          columns: dict[str, Sequence]) -> tuple[np.ndarray, np.ndarray]:
    """Call each function on the B completions and combine: r_b = Σ_f w_f r_fb over the functions
    that scored sample b (TRL's nansum).

    Returns:
      rewards_B (NaN where no function scored the sample, which is then left out of training)
      and per_function_BxF (NaN for None).
    """
    B = len(completions)
    per_function = np.full((B, len(funcs)), np.nan)
    for j, (name, fn) in enumerate(funcs.items()):
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                        **columns)
        except TypeError as e:  # most often a column the function needs that the dataset lacks
            raise ValueError(f"reward function {name!r} failed on the dataset's columns "
                             f"{sorted(columns)}: {e}") from e
        if values is None or len(values) != B:
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"reward function {name!r} returned {got} for {B} completions")
        try:
            per_function[:, j] = [np.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(
                f"reward function {name!r} returned a value that is not a number or None: "
                f"{next(v for v in values if not isinstance(v, (int, float, type(None))))!r}"
            ) from None
    weighted = per_function * np.asarray(weights, np.float64)[None, :]
    scored = ~np.all(np.isnan(per_function), axis=1)
    rewards = np.where(scored, np.nansum(weighted, axis=1), np.nan)
    return rewards, per_function
