"""Typed run configs: YAML files validated into frozen dataclasses, with dotted overrides.

OmegaConf checks keys and types against the dataclasses below, so `train.lr=abc` or a misspelt
`trian.lr=1e-5` is an error naming the key; `load_config` turns it into a `ConfigError` naming the
file too. An ablation is a base YAML plus overrides, never a copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem: the file, the key and what is wrong."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # an HF directory or .gguf file; None builds `init` from scratch
    init: dict[str, Any] = dataclasses.field(default_factory=dict)  # transformers.LlamaConfig kwargs
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: Optional[str] = None  # a dataset file or saved directory in a TRL format
    eval: Optional[str] = None
    synthetic: Optional[str] = None  # instead of files: a task of align_jax.data.synthetic
    synthetic_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_fraction: float = 0.0  # held-out share of `train` when `eval` is not given
    max_length: int = 256
    max_prompt_length: Optional[int] = None
    buckets: Optional[list[int]] = None  # padded lengths; default powers of two up to max_length


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "sft"  # sft | reward | dpo | kto
    steps: int = 100
    batch_size: int = 8  # global, in examples (pairs for preference methods)
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    lr: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant, after linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is an eval split)
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end and on interruption
    keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss_type: str = "sigmoid"  # dpo: a key of losses.DPO_LOSSES, or simpo | orpo; kto: kto | apo_zero_unpaired
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None  # weight of the NLL on chosen completions added to DPO (RPO)
    simpo_gamma: float = 0.5
    reference_free: bool = False
    precompute_ref_logps: bool = False  # reference log-probs once over the dataset, then no reference model
    completion_only: bool = True  # SFT: loss on completion tokens only, else on every token
    margin_column: Optional[str] = None  # reward model: a per-pair margin column
    center_coef: float = 0.0  # reward model: reward centering
    desirable_weight: float = 1.0  # KTO λ_D, λ_U
    undesirable_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: every device not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: str = "tiny"  # a tokenizer directory, a .gguf file, or "tiny" (the synthetic-task tokenizer)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    out_dir: str = "runs/run"
    reference: Optional[str] = None  # the frozen reference policy; default: the initial policy


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (optional) and `key.sub=value` overrides, type-checked."""
    where = os.fspath(path) if path is not None else "<defaults>"
    try:
        merged = OmegaConf.structured(RunConfig)
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"{where}: no such config file")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: key '{key}': {message}" if key else f"{where}: {message}") from None


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
