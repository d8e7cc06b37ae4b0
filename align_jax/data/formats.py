"""TRL's dataset formats: loading, recognising the type, and validating every row.

| kind                 | columns                         | standard form | conversational form     |
|----------------------|---------------------------------|---------------|-------------------------|
| `language_modeling`  | `text` / `messages`             | str           | list of messages        |
| `prompt_completion`  | `prompt`, `completion`          | str, str      | messages, messages      |
| `prompt_only`        | `prompt` (+ any columns)        | str           | messages                |
| `preference`         | `prompt`, `chosen`, `rejected`  | str × 3       | messages × 3            |
|                      | `chosen`, `rejected` (implicit) | the prompt is their shared prefix       |
| `unpaired_preference`| `prompt`, `completion`, `label` | str, str, bool| messages, messages, bool|

A message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`. Every problem
raises `DataError` naming the source, the row (0-based), the column and what is wrong, before
anything is tokenized or trained. JSON, JSONL and CSV files must be UTF-8: the first byte that is
not is named by its offset and line; a Parquet file that cannot be read (truncated, corrupt, not
Parquet) is named with the reader's reason.
"""

from __future__ import annotations

import codecs
import difflib
import os
from typing import Any

import datasets

KINDS = {  # kind -> (required columns, text columns)
    "preference": (("prompt", "chosen", "rejected"), ("prompt", "chosen", "rejected")),
    "unpaired_preference": (("prompt", "completion", "label"), ("prompt", "completion")),
    "prompt_completion": (("prompt", "completion"), ("prompt", "completion")),
    "prompt_only": (("prompt",), ("prompt",)),
    "language_modeling": (("text",), ("text",)),
}
ROLES = ("system", "user", "assistant", "tool")
_KNOWN_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "text", "messages")
_READERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset problem, with where it is: source, row and column."""


def check_utf8(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Raise DataError at the first byte of the file `path` that is not UTF-8, naming its offset
    (0-based) and line (1-based). Reads the file once, in chunks of `chunk_bytes`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # of the chunk about to be read
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            # a character's first bytes, held from the last chunk
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.object is the held bytes followed by this chunk
                at, line = offset - pending + e.start, line + e.object.count(b"\n", 0, e.start)
                raise DataError(f"{path}: not UTF-8 text: byte offset {at} (line {line}) is "
                                f"0x{e.object[e.start]:02x}, "
                                f"{e.reason}; save the file as UTF-8") from None
            if not chunk:
                return
            offset, line = offset + len(chunk), line + chunk.count(b"\n")


def where(source: str, row: int | None = None, column: str | None = None) -> str:
    parts = [source] + ([f"row {row}"] if row is not None else []) + (
        [f"column '{column}'"] if column is not None else [])
    return ", ".join(parts)


def load_rows(source: str | os.PathLike | datasets.Dataset) -> tuple[datasets.Dataset, str]:
    """A `datasets.Dataset` from a JSON/JSONL/Parquet/CSV file, a `save_to_disk` directory or an
    in-memory Dataset, and the name errors will use for it."""
    if isinstance(source, datasets.Dataset):
        return source, "<in-memory dataset>"
    path = os.fspath(source)
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for a directory it cannot read
            raise DataError(f"{path}: not a saved `datasets` directory ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: holds splits {list(ds)}; pass the directory of one split")
        return ds, path
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    reader = _READERS.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type; expected one of {sorted(_READERS)} "
                        f"or a saved directory")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (no rows)")
    if reader != "parquet":
        check_utf8(path)
    try:
        ds = datasets.load_dataset(reader, data_files=path, split="train")
    except Exception as e:
        cause = e.__cause__ or e
        # one line: Arrow's messages span several
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        if reader == "parquet":
            raise DataError(f"{path}: not a readable Parquet file (truncated, corrupt or not "
                            f"Parquet: {reason})") from e
        raise DataError(f"{path}: cannot be read as {reader} ({reason})") from e
    if reader == "csv":  # CSV has no types: a completion "4" is text, not the number pandas infers
        for column in set(ds.column_names) & {"prompt", "chosen", "rejected", "completion", "text"}:
            if ds.features[column].dtype != "string":
                ds = ds.cast_column(column, datasets.Value("string"))
    return ds, path


def detect_kind(columns: list[str], source: str) -> str:
    """The TRL dataset type that these columns make (see the module table). A column that looks
    like a misspelt TRL column ('choosen') is an error, not an extra column."""
    cols = set(columns)
    misspelt = [f"'{c}' (did you mean '{m[0]}'?)" for c in columns if c not in _KNOWN_COLUMNS
                and (m := difflib.get_close_matches(c, _KNOWN_COLUMNS, n=1, cutoff=0.8))]
    if misspelt:
        raise DataError(f"{source}: misnamed column {', '.join(misspelt)}; found {sorted(columns)}")
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired_preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "prompt" in cols:
        return "prompt_only"
    if "text" in cols or "messages" in cols:
        return "language_modeling"
    raise DataError(
        f"{source}: columns {sorted(columns)} match no TRL dataset type; expected one of "
        "prompt+chosen+rejected, chosen+rejected, prompt+completion+label, prompt+completion, "
        "prompt, text or messages")


def text_columns(kind: str, columns: list[str]) -> tuple[str, ...]:
    if kind == "language_modeling":
        return ("messages",) if "messages" in columns and "text" not in columns else ("text",)
    if kind == "preference" and "prompt" not in columns:
        return ("chosen", "rejected")
    return KINDS[kind][1]


def _check_messages(value: list, source: str, row: int, column: str) -> None:
    if not value:
        raise DataError(f"{where(source, row, column)}: empty list of messages")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where(source, row, column)}: message {j} must be a dict with "
                            f"'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(f"{where(source, row, column)}: message {j} has unknown role "
                            f"{message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where(source, row, column)}: message {j} content must be text, got "
                            f"{type(message['content']).__name__}")


def _form(value: Any) -> str:
    return "conversational" if isinstance(value, list) else "standard"


def validate(ds: datasets.Dataset, source: str, kind: str | None = None) -> tuple[str, bool, dict]:
    """Check every row; return (kind, conversational, counts).

    counts["identical_pairs"] is the number of preference rows whose chosen equals rejected
    (kept, since they only dilute the loss, and reported).
    """
    columns = list(ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    kind = kind or detect_kind(columns, source)
    if kind not in KINDS:
        raise DataError(f"{source}: unknown dataset kind {kind!r}; expected one of {sorted(KINDS)}")
    needed = text_columns(kind, columns) + (("label",) if kind == "unpaired_preference" else ())
    for column in needed:
        if column not in columns:
            raise DataError(f"{source}: missing column '{column}' (a {kind} dataset needs "
                            f"{list(needed)}; found {columns})")
    texts = text_columns(kind, columns)
    conversational = _form(ds[0][texts[0]]) == "conversational"
    form = "conversational" if conversational else "standard"
    identical = 0
    for row, example in enumerate(ds):
        for column in texts:
            value = example[column]
            if value is None or not isinstance(value, (str, list)):
                raise DataError(f"{where(source, row, column)}: expected text or a list of "
                                f"messages, got {type(value).__name__} {value!r:.60}")
            if _form(value) != form:
                raise DataError(f"{where(source, row, column)}: {_form(value)} value in a {form} "
                                f"dataset (row 0 set the form); every row must be plain text or "
                                f"every row messages")
            if isinstance(value, list):
                _check_messages(value, source, row, column)
            elif not value.strip() and column != "prompt":
                raise DataError(f"{where(source, row, column)}: empty text")
        if kind == "unpaired_preference" and not isinstance(example["label"], bool):
            raise DataError(f"{where(source, row, 'label')}: label must be a bool (true/false), "
                            f"got {type(example['label']).__name__} {example['label']!r}")
        if kind == "preference" and example["chosen"] == example["rejected"]:
            identical += 1
    return kind, conversational, {"rows": len(ds), "identical_pairs": identical}


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected) at their longest shared prefix:
    of messages for conversational rows, of characters for text (a space just before the split
    goes with the completions, as in TRL)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if (isinstance(chosen, str) and n > 0 and chosen[n - 1] == " "
            and n < min(len(chosen), len(rejected))):
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def unpair(pairs: datasets.Dataset, source: str = "<in-memory dataset>") -> datasets.Dataset:
    """Preference rows (explicit prompt) → unpaired rows for KTO, as TRL's
    `unpair_preference_dataset`: each pair gives (prompt, chosen, label True) then
    (prompt, rejected, label False); other columns are dropped."""
    validate(pairs, source, kind="preference")
    if "prompt" not in pairs.column_names:
        raise DataError(f"{source}: unpair needs an explicit prompt column, "
                        f"got {pairs.column_names}")
    rows = [{"prompt": row["prompt"], "completion": row[column], "label": column == "chosen"}
            for row in pairs for column in ("chosen", "rejected")]
    return datasets.Dataset.from_list(rows)
