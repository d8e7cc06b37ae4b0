"""A corpus of malformed dataset files: each error names the file, row, column and the problem (for
a file that is not UTF-8, the byte offset; for a corrupt Parquet file, the reader's reason)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from align_jax.data import DataError, encode
from align_jax.data.formats import check_utf8

U = [{"role": "user", "content": "hi"}]
A = [{"role": "assistant", "content": "yo"}]

CORPUS = [  # (file name, rows or raw text, expected message after the path)
    ("misnamed.jsonl", [{"prompt": "a", "choosen": "b", "rejected": "c"}],
     r"misnamed column 'choosen' \(did you mean 'chosen'\?\)"),
    ("no_columns_we_know.jsonl", [{"question": "a", "response": "b"}],
     r"match no TRL dataset type"),
    ("list_for_text.jsonl", [{"prompt": "a", "completion": "b"},
                             {"prompt": "a", "completion": ["b", "c"]}],
     r"row 1, column 'completion': conversational value in a standard dataset"),
    ("number_for_text.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                               {"prompt": "a", "chosen": 7, "rejected": "c"}],
     r"row 1, column 'chosen': expected text or a list of messages, got int 7"),
    ("label_not_bool.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                              {"prompt": "a", "completion": "b", "label": "yes"}],
     r"row 1, column 'label': label must be a bool \(true/false\), got str 'yes'"),
    ("empty_chosen.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                            {"prompt": "a", "chosen": " ", "rejected": "c"}],
     r"row 1, column 'chosen': empty text"),
    ("empty_completion.jsonl", [{"prompt": U, "completion": []}],
     r"row 0, column 'completion': empty list of messages"),
    ("no_role.jsonl", [{"prompt": [{"content": "hi"}], "completion": A}],
     r"row 0, column 'prompt': message 0 must be a dict with 'role' and 'content'"),
    ("bad_role.jsonl", [{"messages": U + [{"role": "bot", "content": "yo"}]}],
     r"row 0, column 'messages': message 1 has unknown role 'bot'"),
    ("mixed_forms.jsonl", [{"prompt": U, "completion": A}, {"prompt": "hi", "completion": "yo"}],
     r"row 1, column 'prompt': standard value in a conversational dataset"),
    ("empty.jsonl", "", r"the file is empty \(no rows\)"),
    ("broken.jsonl", '{"prompt": "a", "completion": \n', r"cannot be read as json"),
    ("rows.txt", "prompt,completion\n", r"unknown file type"),
    ("missing.jsonl", None, r"no such file or directory"),
]


@pytest.mark.parametrize("name,rows,message", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_file_gets_a_clear_error(name, rows, message, tok, tmp_path):
    path = tmp_path / name
    if isinstance(rows, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif isinstance(rows, str):
        path.write_text(rows)
    with pytest.raises(DataError, match=message) as info:
        encode(path, tok)
    assert str(info.value).startswith(str(path))


def test_implicit_prompt_that_swallows_a_completion(tok):
    ds = datasets.Dataset.from_list([{"chosen": "The answer is 4",
                                      "rejected": "The answer is 4 or 5"}])
    with pytest.raises(DataError, match=r"row 0, column 'chosen': empty after removing the prompt"):
        encode(ds, tok)


def test_identical_pairs_are_kept_counted_and_logged(tok, caplog):
    ds = datasets.Dataset.from_list([{"prompt": "a ", "chosen": "b", "rejected": "b"},
                                     {"prompt": "a ", "chosen": "b", "rejected": "c"}])
    encoded = encode(ds, tok)
    assert encoded.counts["identical_pairs"] == 1 and len(encoded.examples) == 2
    assert "1 rows with identical pairs" in caplog.text


def test_chat_template_missing_on_the_tokenizer(tok):
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer,
                                                eos_token="<|end|>")
    ds = datasets.Dataset.from_list([{"prompt": U, "completion": A}])
    with pytest.raises(DataError, match=r"conversational rows need a chat template"):
        encode(ds, bare)


def test_bad_saved_directory_and_split_dict(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="not a saved `datasets` directory"):
        encode(tmp_path / "junk", None)
    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"holds splits \['train', 'test'\]"):
        encode(tmp_path / "splits", None)


def test_empty_in_memory_dataset_and_unknown_kind(tok):
    with pytest.raises(DataError, match="the dataset is empty"):
        encode(datasets.Dataset.from_dict({"prompt": []}), tok)
    with pytest.raises(DataError, match="unknown dataset kind 'dpo'"):
        encode(datasets.Dataset.from_list([{"prompt": "a"}]), tok, kind="dpo")
    with pytest.raises(DataError, match=r"missing column 'completion'"):
        encode(datasets.Dataset.from_list([{"prompt": "a"}]), tok, kind="prompt_completion")


NOT_UTF8 = {  # a Latin-1 "café" on the second row of each text format
    "latin1.jsonl": (b'{"prompt": "a", "completion": "b"}\n'
                     b'{"prompt": "caf\xe9", "completion": "b"}\n'),
    "latin1.json": (b'[{"prompt": "a", "completion": "b"},\n'
                    b' {"prompt": "caf\xe9", "completion": "b"}]\n'),
    "latin1.csv": b"prompt,completion\na,b\ncaf\xe9,b\n",
}


@pytest.mark.parametrize("name", NOT_UTF8)
def test_file_that_is_not_utf8_names_the_byte_offset(name, tok, tmp_path):
    path = tmp_path / name
    path.write_bytes(NOT_UTF8[name])
    at = NOT_UTF8[name].index(b"\xe9")
    line = NOT_UTF8[name].count(b"\n", 0, at) + 1
    with pytest.raises(DataError,
                       match=rf"not UTF-8 text: byte offset {at} \(line {line}\) is 0xe9") as info:
        encode(path, tok)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_utf8_check_finds_the_offset_across_chunks(tmp_path):
    """Multi-byte characters split between reads are fine; the bad byte's offset and line are exact
    whichever chunk it falls in, and a file cut inside a character is caught at that character."""
    good = "é\n€x".encode() * 50  # 2- and 3-byte characters, 7 bytes a repeat
    path = tmp_path / "rows.jsonl"
    path.write_bytes(good)
    for chunk in (1, 2, 3, 5, 64):
        check_utf8(str(path), chunk_bytes=chunk)
    path.write_bytes(good[:196] + b"\xff" + good[196:])  # between two repeats
    line = good[:196].count(b"\n") + 1
    for chunk in (1, 3, 7, 64, 1 << 20):
        with pytest.raises(DataError, match=rf"byte offset 196 \(line {line}\) is 0xff"):
            check_utf8(str(path), chunk_bytes=chunk)
    path.write_bytes(good + "€".encode()[:2])
    with pytest.raises(DataError, match=rf"byte offset {len(good)} .* unexpected end of data"):
        check_utf8(str(path), chunk_bytes=4)


def _parquet_bytes():
    table = pa.table({"prompt": [f"prompt {i} " * 4 for i in range(500)],
                      "completion": [f"c{i}" for i in range(500)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="NONE")
    return sink.getvalue().to_pybytes()


PARQUET = {  # name -> the good file's bytes -> corrupt bytes
    "not_parquet": lambda b: b"prompt,completion\na,b\n" * 10,
    "truncated": lambda b: b[: len(b) // 2],
    "overwritten_pages": lambda b: b[:4] + b"\x7f" * 200 + b[204:],
    "overwritten_values": lambda b: b[: len(b) // 3] + b"\xff" * 2000 + b[len(b) // 3 + 2000:],
}


@pytest.mark.parametrize("corrupt", PARQUET)
def test_corrupt_parquet_file_is_a_one_line_error(corrupt, tok, tmp_path):
    path = tmp_path / f"{corrupt}.parquet"
    path.write_bytes(PARQUET[corrupt](_parquet_bytes()))
    with pytest.raises(DataError, match=r"not a readable Parquet file "
                                        r"\(truncated, corrupt or not Parquet: ") as info:
        encode(path, tok)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_cli_reports_a_file_that_is_not_utf8_in_one_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(NOT_UTF8["latin1.jsonl"])
    root = Path(__file__).parents[2]
    run = subprocess.run([sys.executable, "-m", "align_jax", "train", "configs/sft_arithmetic.yaml",
                          f"data.train={path}", f"out_dir={tmp_path / 'run'}"], cwd=root,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"align-jax: error: {path}: not UTF-8 text: byte offset 50 (line 2) is 0xe9, invalid "
        "continuation byte; save the file as UTF-8")
