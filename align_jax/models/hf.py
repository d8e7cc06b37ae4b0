"""Checkpoints in and out: Hugging Face safetensors directories, transformers models, GGUF files.

Loading never executes pickled code: weights come from safetensors or GGUF only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.models.config import DecoderConfig
from align_jax.models.decoder import Decoder
from align_jax.models.registry import FAMILIES, config_from_hf, config_to_hf

# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ParamName(NamedTuple):
    """An HF tensor and where it lives in a Decoder: the path of the NNX variable, its index into
    the variable's stacked leading axes (the layer of a scanned block's "layers" axis, then the
    expert of a stacked expert weight; () for a variable that is the whole tensor), and whether
    the HF tensor is the transpose of ours."""

    hf: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    transposed: bool


def hf_param_names(config: DecoderConfig, scalar_head: bool = False,
                   scan_layers: bool = True) -> Iterator[ParamName]:
    """Every HF tensor of a checkpoint of `config`, in transformers' order, for a Decoder with
    stacked (`scan_layers`) or separate blocks.

    With `scalar_head`, the layout of `…ForSequenceClassification` (one label): `score.weight`
    instead of an LM head."""
    yield ParamName("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), False)
    for i in range(config.num_layers):
        for name, path, transposed, *expert in FAMILIES[config.model_type].block_names(config):
            where = ("layers", *path) if scan_layers else ("layers", i, *path)
            yield ParamName(f"model.layers.{i}.{name}", where,
                            ((i,) if scan_layers else ()) + tuple(expert), transposed)
    yield ParamName("model.norm.weight", ("norm", "weight"), (), False)
    if scalar_head:
        yield ParamName("score.weight", ("score_head", "kernel"), (), True)
    elif not config.tie_word_embeddings:
        yield ParamName("lm_head.weight", ("lm_head", "kernel"), (), True)


def _variable(model: Decoder, path: tuple) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def from_tensors(config: DecoderConfig, tensors: dict[str, Any], *, dtype=jnp.float32,
                 source: str = "checkpoint", scan_layers: bool = True) -> Decoder:
    """Build a Decoder (with stacked or separate blocks: `scan_layers`) from HF-named tensors
    (numpy or jax arrays), never initialising random weights.

    Every expected tensor must be present with the right shape; unexpected tensors are an error
    (they mean the architecture does not match), except recomputed buffers. A `score.weight` tensor
    (a reward model saved as `…ForSequenceClassification`) gives a Decoder with its scalar head.
    """
    scalar_head = "score.weight" in tensors
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                           with_scalar_head=scalar_head,
                                           scan_layers=scan_layers))
    tensors = dict(tensors)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    missing, stacked = [], {}  # stacked: path -> {index: slice} of a stacked variable
    for name, path, index, transposed in hf_param_names(config, scalar_head, scan_layers):
        if name not in tensors:
            missing.append(name)
            continue
        array = tensors.pop(name)
        shape = _variable(model, path).get_value().shape[len(index):]
        expected = tuple(reversed(shape)) if transposed else tuple(shape)
        if tuple(array.shape) != expected:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                             f"expected {expected} for this config")
        array = jnp.asarray(array, dtype=dtype)
        array = array.T if transposed else array
        if index:
            stacked.setdefault(path, {})[index] = array
        else:
            _variable(model, path).set_value(array)
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")
    unexpected = [k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]} for model_type="
                         f"{config.model_type!r}; the checkpoint does not match its config")
    for path, slices in stacked.items():  # row-major order of the indices, then reshaped
        variable = _variable(model, path)
        leading = variable.get_value().shape[:len(next(iter(slices)))]
        rows = jnp.stack([slices[i] for i in sorted(slices)])
        variable.set_value(rows.reshape(leading + rows.shape[1:]))
    return model


def to_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of a Decoder (transformers' layouts and names)."""
    out, host = {}, {}  # host: each variable fetched once, however many slices it stacks
    for name, path, index, transposed in hf_param_names(model.config, hasattr(model, "score_head"),
                                                        model.scan_layers):
        if path not in host:
            host[path] = np.asarray(jax.device_get(_variable(model, path).get_value()))
        array = host[path][index]
        out[name] = np.ascontiguousarray(array.T if transposed else array)
    return out


def _load_safetensors_dir(directory: Path) -> dict[str, Any]:
    from safetensors.flax import load_file  # jax arrays: keeps bf16, which numpy lacks

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shard_names = [p.name for p in sorted(directory.glob("*.safetensors"))]
    if not shard_names:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (pickled .bin checkpoints "
                                "are not loaded; convert them to safetensors)")
    tensors = {}
    for shard in shard_names:
        tensors.update(load_file(str(directory / shard)))
    return tensors


def _reverse_llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs → transformers' split
    halves)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def read_config(source) -> DecoderConfig:
    """The DecoderConfig of an HF directory (its `config.json` alone; no weights are read) or of a
    `.gguf` file (its metadata)."""
    path = Path(source)
    if path.suffix == ".gguf":
        return _gguf_config(gguf_version(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None
    return config_from_hf(hf_config, source=str(config_file))


def gguf_version(path: Path) -> tuple[str, int, int]:
    """A GGUF file as the key of the caches of its parsed metadata: (path, modification time,
    size), so a rewritten file is read again. Parsing the metadata (a 49k-token vocabulary takes
    seconds) happens once per process for the config, the tensors' index and the tokenizer."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _gguf_config(version: tuple[str, int, int]) -> DecoderConfig:
    from transformers import AutoConfig

    path = Path(version[0])
    return config_from_hf(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                          source=str(path))


@functools.lru_cache(maxsize=4)
def _gguf_reader(version: tuple[str, int, int]):
    import gguf

    return gguf.GGUFReader(version[0])


def _load_gguf(path: Path) -> tuple[DecoderConfig, dict[str, np.ndarray]]:
    import gguf

    config = read_config(path)
    if not FAMILIES[config.model_type].gguf:
        raise ValueError(f"{path}: GGUF files of model_type={config.model_type!r} are not read; "
                         f"convert it to a safetensors directory")
    reader = _gguf_reader(gguf_version(path))
    tensors = {}
    for t in reader.tensors:
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            _, layer, kind, suffix = t.name.split(".")
            if kind not in _GGUF_BLOCK_NAMES:
                raise ValueError(f"{path}: unsupported GGUF tensor {t.name!r}")
            name = f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[kind]}.{suffix}"
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if (config.model_type in ("llama", "mistral")
                and t.name.endswith(("attn_q.weight", "attn_k.weight"))):
            heads = config.num_heads if "attn_q" in t.name else config.num_kv_heads
            w = _reverse_llama_cpp_permute(w, heads)
        tensors[name] = w
    return config, tensors


def load_pretrained(source, *, dtype=jnp.float32, scan_layers: bool = True) -> Decoder:
    """A Decoder from a local HF directory, a `.gguf` file, or an in-memory transformers model;
    its blocks stacked for a scan, or separate modules (`scan_layers=False`).

    HF directory: `config.json` and one or several `*.safetensors` files (with
    `model.safetensors.index.json` when sharded). GGUF: dequantised with the `gguf` package; its
    config is read by transformers. transformers model: a `PreTrainedModel` of a supported type.
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        config = config_from_hf(source.config, source=type(source).__name__)
        tensors = {k: v.detach().float().cpu().numpy() for k, v in source.state_dict().items()}
        if FAMILIES[config.model_type].unfuse is not None:
            tensors = FAMILIES[config.model_type].unfuse(tensors, config)
        return from_tensors(config, tensors, dtype=dtype, source=type(source).__name__,
                            scan_layers=scan_layers)
    path = Path(source)
    if path.suffix == ".gguf":
        config, tensors = _load_gguf(path)
        return from_tensors(config, tensors, dtype=dtype, source=str(path), scan_layers=scan_layers)
    return from_tensors(read_config(path), _load_safetensors_dir(path), dtype=dtype,
                        source=str(path), scan_layers=scan_layers)


@contextlib.contextmanager
def written_atomically(path) -> Iterator[Path]:
    """A staging directory next to `path`, renamed into place (replacing a directory there) when
    the block ends, removed when it raises: a crash never leaves a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_pretrained(model: Decoder, path, *, tokenizer=None) -> Path:
    """Write an HF directory (config.json, model.safetensors, tokenizer files) atomically.

    A model with a scalar head is written as its family's sequence classifier with one label
    (`score.weight`), which scores each sequence at its last non-pad token as `Decoder.score`
    does; the tokenizer's pad token id goes into the config for that. The directory is assembled
    next to `path` and renamed into place, so a crash never leaves a half-written checkpoint; an
    existing directory at `path` is replaced.
    """
    from safetensors.flax import save_file  # keeps bfloat16 weights as bfloat16

    with written_atomically(path) as staging:
        config = config_to_hf(model.config)
        config["torch_dtype"] = str(np.dtype(model.embed_tokens.embedding.get_value().dtype))
        tensors = {k: jnp.asarray(v) for k, v in to_tensors(model).items()}
        if hasattr(model, "score_head"):
            config["architectures"] = [FAMILIES[model.config.model_type].classifier]
            config["num_labels"] = 1
            if tokenizer is not None:
                config["pad_token_id"] = tokenizer.pad_token_id
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return Path(path)
