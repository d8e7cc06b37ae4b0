"""LoRA adapters in and out in PEFT's format, and merged into their base.

A PEFT LoRA directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
…) and `adapter_model.safetensors` with, per targeted projection of layer i,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight` [R, I] and `lora_B.weight`
[O, R] (torch's [out, in] layout: the transposes of our A [I, R] and B [R, O]), and for a
sequence classifier its head, `base_model.model.score.weight`. `peft.PeftModel.from_pretrained`
loads what `write_adapter` writes onto the transformers model of the same base, and `read_adapter`
reads what PEFT saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.config import ConfigError, LoRAConfig
from align_jax.models.decoder import Decoder
from align_jax.models.hf import written_atomically
from align_jax.models.lora import TRAINABLE, lora_scale
from align_jax.models.quant import dequantize

_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_PREFIX = "base_model.model."
_SCORE = _PREFIX + "score.weight"
# adapter_config.json keys whose non-default values change the model in ways we do not build
_UNSUPPORTED = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "fan_in_fan_out": False, "lora_bias": False,
                "layer_replication": None, "trainable_token_indices": None}
# initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ)
_BASE_CHANGING_INITS = ("olora", "corda", "loftq")


def adapter_names(num_layers: int, targets, scan_layers: bool
                  ) -> Iterator[tuple[str, tuple, int | None]]:
    """(PEFT tensor name, the path of our LoRAParam, its index on a stacked layers axis or None)
    for every adapter matrix."""
    for i in range(num_layers):
        for proj in targets:
            where = (("layers", _GROUP[proj], proj) if scan_layers
                     else ("layers", i, _GROUP[proj], proj))
            for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                yield (f"{_PREFIX}model.layers.{i}.{_GROUP[proj]}.{proj}.{theirs}.weight",
                       (*where, ours), i if scan_layers else None)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def write_adapter(model, lora: LoRAConfig, path, *, base_model: str | None = None) -> Path:
    """Write `model`'s adapters (and scalar head) as a PEFT LoRA directory, atomically."""
    from safetensors.numpy import save_file

    # only what is written: the adapters and a scalar head, not the base
    host = jax.device_get(nnx.to_pure_dict(nnx.state(model, TRAINABLE)))
    tensors = {}
    for name, where, layer in adapter_names(model.config.num_layers, lora.targets,
                                            model.scan_layers):
        array = np.asarray(_get(host, where), np.float32)
        tensors[name] = np.ascontiguousarray((array if layer is None else array[layer]).T)
    scalar = hasattr(model, "score_head")
    if scalar:
        tensors[_SCORE] = np.ascontiguousarray(
            np.asarray(host["score_head"]["kernel"], np.float32).T)
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if scalar else "CAUSAL_LM",
              "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": list(lora.targets), "use_rslora": lora.rslora,
              "modules_to_save": ["score"] if scalar else None,
              "base_model_name_or_path": base_model,
              "inference_mode": True, "init_lora_weights": True, **_UNSUPPORTED}
    with written_atomically(path) as staging:
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def _check_config(file: Path, found, lora: LoRAConfig) -> None:
    """ConfigError naming the file and key where a PEFT config differs from `model.lora` or asks
    for a variant we do not build."""
    if not isinstance(found, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    if found.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type={found.get('peft_type')!r}, expected 'LORA'")
    for key, default in _UNSUPPORTED.items():
        if found.get(key) is not None and found[key] != default:
            raise ConfigError(f"{file}: {key}={found[key]!r} is not supported (expected "
                              f"{default!r})")
    if found.get("init_lora_weights") in _BASE_CHANGING_INITS or str(
            found.get("init_lora_weights")).startswith("pissa"):
        raise ConfigError(f"{file}: init_lora_weights={found['init_lora_weights']!r} changes the "
                          "base weights, which a PEFT adapter directory does not hold")
    expected = {"r": (lora.rank, "rank"), "lora_alpha": (lora.alpha, "alpha"),
                "use_rslora": (lora.rslora, "rslora")}
    for key, (ours, name) in expected.items():
        if found.get(key, False if key == "use_rslora" else None) != ours:
            raise ConfigError(f"{file}: {key}={found.get(key)!r} but model.lora.{name}={ours!r}; "
                              "set model.lora to the adapter's settings")
    targets = found.get("target_modules")
    if isinstance(targets, str) or sorted(targets or []) != sorted(lora.targets):
        raise ConfigError(f"{file}: target_modules={targets!r} but model.lora.targets="
                          f"{list(lora.targets)}")


def _read(directory: Path) -> tuple[Path, object, Path, dict]:
    """(config file, its JSON, weights file, its tensors) of a PEFT directory; ConfigError naming
    the file that is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_file = directory / "adapter_config.json"
    weights = directory / "adapter_model.safetensors"
    for file in (config_file, weights):
        if not file.is_file():
            raise ConfigError(f"model.lora.init_from: {file} does not exist (a PEFT adapter "
                              "directory holds adapter_config.json and adapter_model.safetensors)")
    try:
        found = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}: invalid JSON ({e})") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({e})") from None
    return config_file, found, weights, tensors


def read_adapter(path, abstract: nnx.State, lora: LoRAConfig) -> nnx.State:
    """The adapters of the PEFT directory `path` laid out as `abstract` (a model's trainable
    parameters: its LoRAParams and a scalar head's `score_head`), with the head's weights when the
    adapter holds them (PEFT's `modules_to_save`); ConfigError naming the file and key or tensor
    when they do not fit the model."""
    config_file, found, weights, tensors = _read(Path(path))
    _check_config(config_file, found, lora)
    score = tensors.pop(_SCORE, None)
    adapters, head = nnx.split_state(abstract, nnx.LoRAParam, ...)
    tree = nnx.to_pure_dict(adapters)
    stacked = not any(isinstance(key, int) for key in tree["layers"])  # else one per layer
    num_layers = (next(iter(jax.tree.leaves(tree))).shape[0] if stacked
                  else len(tree["layers"]))
    slices: dict[tuple, list] = {}
    for name, where, layer in adapter_names(num_layers, lora.targets, stacked):
        if name not in tensors:
            raise ConfigError(f"{weights}: no tensor {name!r}; the adapter is for another model")
        shape = _get(tree, where).shape[0 if layer is None else 1:]
        slices.setdefault(where, []).append(_tensor(weights, name, tensors.pop(name), shape))
    if tensors:
        raise ConfigError(f"{weights}: unexpected tensors {sorted(tensors)[:3]}; the adapter is "
                          "for another model")
    for where, arrays in slices.items():
        _set(tree, where, jnp.stack(arrays) if stacked else arrays[0])
    state = jax.tree.map(lambda x: x, adapters)
    nnx.replace_by_pure_dict(state, tree)
    if score is None:
        return state
    head_tree = nnx.to_pure_dict(head)
    if "score_head" not in head_tree:
        raise ConfigError(f"{weights}: holds a sequence classifier's head ({_SCORE!r}) but the "
                          "model has no scalar head")
    kernel = head_tree["score_head"]["kernel"]
    head_tree["score_head"]["kernel"] = _tensor(weights, _SCORE, score, kernel.shape)
    head = jax.tree.map(lambda x: x, head)
    nnx.replace_by_pure_dict(head, head_tree)
    return nnx.merge_state(state, head)


def _tensor(file: Path, name: str, array: np.ndarray, shape: tuple) -> jax.Array:
    """Our [in, out] layout of a torch [out, in] tensor, checked against `shape`."""
    if tuple(array.shape[::-1]) != tuple(shape):
        raise ConfigError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                          f"{tuple(shape[::-1])}: the adapter is for another base")
    return jnp.asarray(array.T, jnp.float32)


def merged_params(model, lora: LoRAConfig) -> dict:
    """`model`'s parameters as a pure dict without adapters or quantization: every projection's
    kernel W + s·A·B (W dequantized), in the dtype of its embedding."""
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtype = tree["embed_tokens"]["embedding"].dtype
    scale = lora_scale(lora)

    def merge(node: dict):
        for name, child in list(node.items()):
            if not isinstance(child, dict):
                continue
            if "kernel_scale" in child or "lora_a" in child:
                w = (dequantize(child.pop("kernel"), child.pop("kernel_scale"), model_quant(model),
                                jnp.float32) if "kernel_scale" in child
                     else child.pop("kernel").astype(jnp.float32))
                if "lora_a" in child:
                    a, b = child.pop("lora_a"), child.pop("lora_b")
                    w = w + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
                child["kernel"] = w.astype(dtype)
            else:
                merge(child)

    merge(tree)
    return tree


def merge_adapters(model, lora: LoRAConfig) -> Decoder:
    """A Decoder without adapters whose kernels are `model`'s merged ones (`merged_params`): what
    `out_dir/model/` holds after a LoRA run."""
    params = merged_params(model, lora)
    dtype = params["embed_tokens"]["embedding"].dtype
    plain = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                           param_dtype=dtype,
                                           with_scalar_head=hasattr(model, "score_head"),
                                           scan_layers=model.scan_layers))
    state = nnx.state(plain)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(plain, state)
    return plain


def model_quant(model) -> str | None:
    """The quantization of `model`'s projections, or None."""
    for _, module in nnx.iter_graph(model):
        if getattr(module, "quant", None) is not None:
            return module.quant
    return None
