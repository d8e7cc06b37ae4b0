"""A corpus of malformed dataset files: each error names the file, row, column and the problem."""

import json

import datasets
import pytest
import transformers

from align_jax.data import DataError, encode

U = [{"role": "user", "content": "hi"}]
A = [{"role": "assistant", "content": "yo"}]

CORPUS = [  # (file name, rows or raw text, expected message after the path)
    ("misnamed.jsonl", [{"prompt": "a", "choosen": "b", "rejected": "c"}],
     r"misnamed column 'choosen' \(did you mean 'chosen'\?\)"),
    ("no_columns_we_know.jsonl", [{"question": "a", "response": "b"}], r"match no TRL dataset type"),
    ("list_for_text.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ["b", "c"]}],
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
    ("empty_completion.jsonl", [{"prompt": U, "completion": []}], r"row 0, column 'completion': empty list of messages"),
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
    ds = datasets.Dataset.from_list([{"chosen": "The answer is 4", "rejected": "The answer is 4 or 5"}])
    with pytest.raises(DataError, match=r"row 0, column 'chosen': empty after removing the prompt"):
        encode(ds, tok)


def test_identical_pairs_are_kept_counted_and_logged(tok, caplog):
    ds = datasets.Dataset.from_list([{"prompt": "a ", "chosen": "b", "rejected": "b"},
                                     {"prompt": "a ", "chosen": "b", "rejected": "c"}])
    encoded = encode(ds, tok)
    assert encoded.counts["identical_pairs"] == 1 and len(encoded.examples) == 2
    assert "1 rows with identical pairs" in caplog.text


def test_chat_template_missing_on_the_tokenizer(tok):
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|end|>")
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
