"""Rows in TRL's formats → token ids with an exact prompt/completion boundary.

As TRL: a standard (text) row is tokenized as `prompt` and as `prompt + completion`, with EOS
appended to completions that do not already end with it; a conversational row is rendered with
the tokenizer's chat template, the prompt with the generation prompt, and `prompt + completion`
as one conversation. The completion is what the joint tokenization adds after the prompt's
tokens; a row where the joint tokenization does not start with the prompt's is counted
(`prefix_mismatches`) rather than silently accepted.

Each example is a dict of int lists: `prompt_ids` and, by kind, `completion_ids`, `chosen_ids`
and `rejected_ids`; unpaired rows add `label`, preference rows a `margin` column when there is
one, prompt-only rows keep all their other columns.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from align_jax.data.formats import (
    KINDS,
    DataError,
    extract_prompt,
    load_rows,
    text_columns,
    validate,
    where,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoded:
    """A tokenized dataset and what happened on the way (every count is also logged)."""

    kind: str
    conversational: bool
    examples: list[dict[str, Any]]
    source: str
    counts: dict[str, int]


def _render(tokenizer, messages, *, generation_prompt: bool, tools=None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, tools=tools,
                                        add_generation_prompt=generation_prompt, return_dict=False)
    # a BatchEncoding in some versions
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _split(tokenizer, prompt, completion, conversational: bool,
           counts: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) where completion ids follow the prompt's in the joint
    tokenization."""
    if conversational:
        prompt_ids = _render(tokenizer, prompt, generation_prompt=True) if prompt else []
        joint = _render(tokenizer, list(prompt or []) + list(completion), generation_prompt=False)
    else:
        eos = tokenizer.eos_token or ""
        if not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
        joint = tokenizer((prompt or "") + completion)["input_ids"]
    if joint[: len(prompt_ids)] != prompt_ids:
        counts["prefix_mismatches"] += 1
    return list(prompt_ids), list(joint[len(prompt_ids):])


def render_pair(tokenizer, prompt, completion) -> list[int]:
    """The ids of prompt + completion exactly as training tokenizes them (chat template for
    messages, EOS appended to text)."""
    prompt_ids, completion_ids = _split(tokenizer, prompt, completion,
                                        not isinstance(completion, str), {"prefix_mismatches": 0})
    return prompt_ids + completion_ids


def encode(source, tokenizer, *, kind: str | None = None, tools: list[dict] | None = None
           ) -> Encoded:
    """Load, validate and tokenize a dataset (a path, a saved directory or a `datasets.Dataset`);
    conversational prompt-only rows are rendered with the JSON schemas of `tools`, which the chat
    template lays out for the model."""
    ds, name = load_rows(source)
    kind, conversational, counts = validate(ds, name, kind)
    counts = dict(counts, prefix_mismatches=0)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{name}: conversational rows need a chat template, and the tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} "
                        f"has none")
    columns = ds.column_names
    texts = text_columns(kind, columns)
    extra = [c for c in columns if c not in KINDS[kind][0] and c not in texts]
    examples = []
    for row, example in enumerate(ds):
        out: dict[str, Any]
        if kind == "language_modeling":
            column = texts[0]
            _, ids = _split(tokenizer, None, example[column], conversational, counts)
            out = {"prompt_ids": [], "completion_ids": ids}
        elif kind == "prompt_only":
            prompt = example["prompt"]
            ids = (_render(tokenizer, prompt, generation_prompt=True, tools=tools)
                   if conversational else tokenizer(prompt)["input_ids"])
            out = {"prompt_ids": list(ids), "prompt": prompt, **{c: example[c] for c in extra}}
        elif kind == "preference":
            prompt, chosen, rejected = ((example["prompt"], example["chosen"], example["rejected"])
                                        if "prompt" in columns
                                        else extract_prompt(example["chosen"], example["rejected"]))
            for column, value in (("chosen", chosen), ("rejected", rejected)):
                if not value and example["chosen"] != example["rejected"]:
                    raise DataError(f"{where(name, row, column)}: empty after removing the prompt "
                                    "shared with the other completion")
            prompt_ids, chosen_ids = _split(tokenizer, prompt, chosen, conversational, counts)
            _, rejected_ids = _split(tokenizer, prompt, rejected, conversational, counts)
            out = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
            if "margin" in columns:  # a reward model's per-pair margin (Llama 2)
                out["margin"] = float(example["margin"])
        else:  # prompt_completion, unpaired_preference
            prompt_ids, completion_ids = _split(tokenizer, example["prompt"], example["completion"],
                                                conversational, counts)
            out = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
            if kind == "unpaired_preference":
                out["label"] = example["label"]
        examples.append(out)
    for key in ("identical_pairs", "prefix_mismatches"):
        if counts[key]:
            log.warning("%s: %d rows with %s", name, counts[key], key.replace("_", " "))
    return Encoded(kind, conversational, examples, name, counts)
