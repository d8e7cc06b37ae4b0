"""What the host loops of offline (`run.py`) and online (`rl.py`) training share: tokenizers,
data sources, models, gathers, signals, the run's config record, metric logs and Orbax checkpoints.

Resuming (`--resume`) is guarded three ways: the config must match the one the checkpoints were
trained with outside `RESUMABLE` (`record_config`); an unreadable latest checkpoint gives way to
the newest readable one (`Checkpoints.restore`); and `metrics.jsonl` is cut back to the restored
step, so a step killed after its last checkpoint is logged once (`MetricLog`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import transformers
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from omegaconf import OmegaConf

from align_jax import ops
from align_jax.config import ConfigError, RunConfig, to_yaml
from align_jax.data import DataError, synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import Decoder, DecoderConfig, load_pretrained
from align_jax.models.decoder import ATTENTION, remat_policy
from align_jax.models.hf import gguf_version
from align_jax.models.lora import PROJECTIONS
from align_jax.models.quant import BASE_DTYPES, QUANTIZED
from align_jax.models.registry import config_from_init
from align_jax.train.mesh import activation_sharding

log = logging.getLogger(__name__)

# Config keys `--resume` may change, each logged as old → new: the length and learning-rate
# schedule of the run, what it logs, evaluates and keeps, where it lives, and how the same update
# is computed and placed on devices (mesh, gradient accumulation, rematerialisation, the chunked
# LM head). Any other difference (the method, the model, the data, the batch, the loss, the
# optimizer's form, the seed) is refused.
RESUMABLE = ("train.steps", "train.lr", "train.schedule", "train.warmup_steps", "train.log_every",
             "train.eval_every", "train.eval_on_start", "train.eval_batches",
             "train.early_stopping_patience", "train.checkpoint_every", "train.keep_checkpoints",
             "train.wandb_project", "train.micro_batches", "model.remat", "model.attention",
             "model.logits_chunk", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert",
             "out_dir")
_ABSENT = "(absent)"


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf and the step refused the update; the checkpoints written
    before it are left as they were."""


class CheckpointError(ConfigError):
    """No checkpoint of the run can be restored (a ConfigError, so the CLI reports it in one
    line)."""


def load_tokenizer(spec: str):
    """The tiny tokenizer, an HF directory's or hub name's, or a GGUF file's (parsed once per
    process, `gguf_version`; each caller gets its own copy)."""
    if spec == "tiny":
        return tiny_tokenizer()
    path = Path(spec)
    if path.suffix == ".gguf":
        return copy.deepcopy(_gguf_tokenizer(gguf_version(path)))
    return transformers.AutoTokenizer.from_pretrained(spec)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(version: tuple[str, int, int]):
    path = Path(version[0])
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def data_source(path: str | None, cfg: RunConfig, seed_offset: int):
    """A dataset file, or the config's synthetic task drawn with seed + `seed_offset`."""
    if path is not None:
        return path
    if cfg.data.synthetic is None:
        raise DataError("config: set data.train (a dataset file) or data.synthetic (a task name)")
    if cfg.data.synthetic not in synthetic.TASKS:
        raise DataError(f"config: data.synthetic {cfg.data.synthetic!r} is not one of "
                        f"{sorted(synthetic.TASKS)}")
    args = dict(cfg.data.synthetic_args)
    args["seed"] = args.get("seed", 0) + seed_offset
    return synthetic.TASKS[cfg.data.synthetic](**args)


def check_lora(cfg: RunConfig) -> None:
    """ConfigError naming the `model.lora` key that is out of range."""
    lora = cfg.model.lora
    if lora.rank <= 0:
        raise ConfigError(f"model.lora.rank={lora.rank}: the adapters' rank must be positive")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout}: expected 0 <= dropout < 1")
    unknown = [t for t in lora.targets if t not in PROJECTIONS]
    if unknown or not lora.targets:
        raise ConfigError(f"model.lora.targets: {unknown or 'none'} match no module; targets are "
                          f"names of {list(PROJECTIONS)}")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"model.lora.targets: {list(lora.targets)} names a module twice")
    if lora.dropout and cfg.train.method in ("grpo", "ppo"):
        raise ConfigError("model.lora.dropout must be 0 for online methods: the sampler's "
                          "log-probs are the behaviour policy's, and the trainer's must equal them")
    base = lora.base_dtype or cfg.model.dtype
    if base not in BASE_DTYPES:
        raise ConfigError(f"model.lora.base_dtype={base!r}: expected one of {BASE_DTYPES}")
    if base not in QUANTIZED and base != cfg.model.dtype:
        raise ConfigError(f"model.lora.base_dtype={base}: a floating-point base is held in the "
                          f"compute dtype, model.dtype={cfg.model.dtype}")


def base_quant(cfg: RunConfig) -> str | None:
    """How a LoRA run stores its frozen base's projections: "int8", "nf4", or None (as floats)."""
    lora = cfg.model.lora
    return lora.base_dtype if lora is not None and lora.base_dtype in QUANTIZED else None


def build_model(cfg: RunConfig, mesh: Mesh, *, with_scalar_head: bool = False,
                path: str | None = None):
    """(make_model, make_base, pretrained params or None): the constructors (`decoder_factory`)
    of the model the run trains and of its frozen base (the same without LoRA adapters; the same
    model when there are none), and the starting weights, from `path` (default `model.path`) or
    `model.init` from scratch."""
    if cfg.model.lora is not None:
        check_lora(cfg)
    pretrained = None
    path = path or cfg.model.path
    if path is not None:
        config, pretrained = pretrained_params(cfg, path)
    else:
        try:
            config = config_from_init(cfg.model.init)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    make_model = decoder_factory(cfg, config, mesh, with_scalar_head)
    make_base = (make_model if cfg.model.lora is None
                 else decoder_factory(cfg, config, mesh, with_scalar_head, adapters=False))
    return make_model, make_base, pretrained


def pretrained_params(cfg: RunConfig, path: str) -> tuple[DecoderConfig, nnx.State]:
    """(config, parameters) of the checkpoint at `path`, in the run's layer layout
    (`model.scan_layers`)."""
    loaded = load_pretrained(path, scan_layers=cfg.model.scan_layers)
    return loaded.config, nnx.split(loaded)[1]


def compute_dtype(cfg: RunConfig):
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: expected float32 or bfloat16")
    return jnp.dtype(cfg.model.dtype)


def frozen_params(params: nnx.State, cfg: RunConfig) -> nnx.State:
    """A frozen model's parameters (reference, reward model) in their own buffers (the train
    state's are donated) and in the compute dtype: never updated, they need no float32 master
    copy, so a bfloat16 run holds them at half the size."""
    return ops.cast_floating(params, compute_dtype(cfg), copy=True)


def decoder_factory(cfg: RunConfig, config: DecoderConfig, mesh: Mesh,
                    with_scalar_head: bool = False, *, adapters: bool = True,
                    quantized: bool = True):
    """rngs -> a Decoder of `config` with the run's compute dtype, remat, LM-head chunking,
    activation sharding on `mesh`, and its LoRA adapters (unless not `adapters`) and quantized
    base projections (unless not `quantized`) when `model.lora` asks for them."""
    dtype = compute_dtype(cfg)
    if cfg.model.logits_chunk is not None and cfg.model.logits_chunk < 1:
        raise ConfigError(f"model.logits_chunk must be a positive number of positions, got "
                          f"{cfg.model.logits_chunk}")
    try:
        remat = remat_policy(cfg.model.remat)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    if cfg.model.attention not in ATTENTION:
        raise ConfigError(f"model.attention={cfg.model.attention!r}: expected one of {ATTENTION}")
    if cfg.model.attention == "cudnn" and cfg.model.dtype != "bfloat16":
        raise ConfigError("model.attention=cudnn needs model.dtype=bfloat16 (cuDNN's fused "
                          "attention takes bf16 or fp16)")
    if cfg.model.lora is not None:
        check_lora(cfg)
    if adapters:  # the trained model (a frozen reward model or reference is only read)
        check_experts(cfg, config, mesh)
    if cfg.model.router_aux_coef is not None:
        config = dataclasses.replace(config, router_aux_loss_coef=cfg.model.router_aux_coef)
    quant = base_quant(cfg)
    return lambda rngs: Decoder(config, rngs=rngs, dtype=dtype, remat=remat,
                                logits_chunk=cfg.model.logits_chunk,
                                with_scalar_head=with_scalar_head,
                                activation_sharding=activation_sharding(mesh),
                                attention=cfg.model.attention,
                                scan_layers=cfg.model.scan_layers,
                                lora=cfg.model.lora if adapters else None,
                                quant=quant if quantized else None)


def check_experts(cfg: RunConfig, config: DecoderConfig, mesh: Mesh) -> None:
    """What a run of a mixture-of-experts model cannot do: split its experts unevenly over the
    mesh (`moe.expert_parallel` gives each device E / n whole experts and I / t of their width),
    adapt its experts with LoRA (its attention only; the experts stay unquantized), or vmap a
    sweep's members (the grouped expert products, `jax.lax.ragged_dot`, have no batching rule
    over members)."""
    if not config.num_experts:
        return
    for what, size, axis in (("num_experts", config.num_experts, "expert"),
                             ("moe_intermediate_size", config.moe_intermediate_size, "tensor")):
        if size % mesh.shape[axis]:
            raise ConfigError(f"mesh.{axis}={mesh.shape[axis]} does not divide the model's "
                              f"{what}={size} ({config.model_type})")
    if cfg.sweep.field is not None:
        raise ConfigError(f"sweep.field={cfg.sweep.field}: a sweep over a mixture-of-experts "
                          f"model ({config.model_type}) is not supported; run its members as "
                          f"separate runs")
    if cfg.model.lora is None:
        return
    experts = [t for t in cfg.model.lora.targets if t in ("gate_proj", "up_proj", "down_proj")]
    if experts:
        raise ConfigError(f"model.lora.targets: {experts} are the experts of a mixture-of-experts "
                          f"model ({config.model_type}), which LoRA does not adapt; set "
                          f"model.lora.targets=[q_proj,k_proj,v_proj,o_proj]")
    if base_quant(cfg) is not None:
        raise ConfigError(f"model.lora.base_dtype={cfg.model.lora.base_dtype}: a quantized base "
                          f"of a mixture-of-experts model ({config.model_type}) is not supported")


def gather_to_host(tree):
    """Global arrays (sharded over devices of every process) → full NumPy arrays on each host: an
    all-gather over processes, so every process must call it at the same point."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class StopSignal:
    """SIGTERM / Ctrl-C ask the loop to checkpoint and return at the next step boundary."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.requested = True
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: value}; an empty dict is a value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved_yaml: str, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key where `cfg` differs from the config
    saved as `saved_yaml`; a key missing from the saved file counts as its current default."""
    saved = OmegaConf.merge(OmegaConf.create(to_yaml(RunConfig())), OmegaConf.create(saved_yaml))
    old, new = (_flat(OmegaConf.to_container(saved)),
                _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))))
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(old.keys() | new.keys())
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def has_checkpoints(out: Path) -> bool:
    return ((out / "checkpoints").is_dir()
            and any(p.name.isdigit() for p in (out / "checkpoints").iterdir()))


def record_config(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Write `out/config.yaml`. When resuming over checkpoints, first compare `cfg` with the
    config.yaml they were trained with: keys in `RESUMABLE` may change (a warning names each
    old → new); any other difference raises ConfigError naming every differing key, and the saved
    file is left as it was."""
    path = out / "config.yaml"
    if resume and has_checkpoints(out):
        if not path.exists():
            log.warning("%s: no config.yaml to check the resumed config against", out)
        else:
            changes = config_changes(path.read_text(), cfg)
            show = lambda k: f"{k}: {changes[k][0]!r:.60} → {changes[k][1]!r:.60}"  # noqa: E731
            refused = [k for k in changes if k not in RESUMABLE]
            if refused:
                raise ConfigError(f"{path}: --resume with a config that differs from the one the "
                                  "checkpoints were trained with, in "
                                  f"{'; '.join(map(show, refused))}; only {', '.join(RESUMABLE)} "
                                  "may change on resume (for a different run, choose another "
                                  "out_dir)")
            if changes:
                log.warning("resuming with a changed config: %s", "; ".join(map(show, changes)))
    path.write_text(to_yaml(cfg))


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the records of the JSONL log `path` after step `last_step` (and a last line cut short),
    rewriting it atomically: a temporary file, then os.replace."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("%s: dropped %d records after step %d, the step this run starts from", path,
             len(lines) - len(kept), last_step)


def wandb_run(out: Path, cfg: RunConfig):
    """The Weights & Biases run of `out` (named after it), continued when `out` has logged to one
    before: its id is kept in `out/wandb_run_id`, so `--resume` logs on to the same run."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project needs the wandb package: "
                          "pip install 'align_jax[wandb]'") from None
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.train.wandb_project, id=run_id, name=out.name, dir=str(out),
                      resume="allow", config=dataclasses.asdict(cfg))


class MetricLog:
    """`metrics.jsonl` (one object per logged step, with its `split`), TensorBoard events in `tb/`
    and, with `train.wandb_project`, a W&B run, written by the first process only.

    `start` is the step the run starts from (a restored checkpoint's, else 0): records of later
    steps, logged by a run killed after that checkpoint, are dropped from `metrics.jsonl` and hidden
    in TensorBoard (its purge_step), so each step is logged once.
    """

    def __init__(self, out: Path, cfg: RunConfig, start: int = 0):
        from tensorboardX import SummaryWriter

        self.primary = jax.process_index() == 0
        if self.primary:
            trim_metrics(out / "metrics.jsonl", start)
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1) if self.primary else None
        self.jsonl = open(out / "metrics.jsonl", "a") if self.primary else None
        self.wandb = wandb_run(out, cfg) if self.primary and cfg.train.wandb_project else None

    def write(self, split: str, step: int, metrics: dict[str, float]):
        if not self.primary:
            return
        record = {"split": split, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.writer.add_scalar(f"{split}/{k}", float(v), step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def close(self):
        if self.primary:
            self.writer.close()
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _unreadable(e: BaseException) -> str | None:
    """Why a checkpoint could not be restored, in one line, when `e` is a failure to read its
    files: Orbax raises a bare Exception around TensorStore's ValueError for a missing, truncated
    or corrupt array file, ValueError for unparsable metadata or a tree that does not match, OSError
    for a missing file and KeyError for a missing item. None for anything else."""
    reasons = []
    while e is not None:
        if isinstance(e, (OSError, ValueError, KeyError)):
            reasons.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
        e = e.__cause__ or e.__context__
    if not reasons:
        return None
    # without TensorStore's dumps
    reason = re.split(r" \[(?:source locations|tensorstore_spec)", reasons[-1])[0]
    return reason if len(reason) <= 300 else reason[:300] + "…"


def _all_processes(ok: bool) -> bool:
    """`ok` on every process (a checkpoint one process cannot read is skipped by all)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpoints:
    """Orbax checkpoints of the train state (with its rng) and a JSON side record (data position,
    controller state), the last `keep` kept. Starting over existing checkpoints without `resume`
    is refused, so a run is never silently overwritten.

    Resuming restores the newest checkpoint that can be read. One whose files are missing,
    truncated or corrupt is named in a warning with the one used instead, and moved out of the way
    to `out/unreadable_checkpoints/<step>` (kept for inspection; the run saves that step anew).
    With none readable, CheckpointError names each step and why, and nothing is moved.
    """

    def __init__(self, out: Path, keep: int, resume: bool):
        self.out = out
        self.manager = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep))
        latest = self.manager.latest_step()
        if not resume and latest is not None:
            raise ConfigError(f"{out}: holds checkpoints up to step {latest}; continue them with "
                              "--resume (resume=True) or choose another out_dir")
        self.resume = resume and latest is not None
        self.step = None  # the step restored from

    def restore(self, state, shardings) -> tuple[Any, dict] | None:
        """(state, side record) of the newest readable checkpoint when resuming, else None."""
        if not self.resume:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
        unreadable = []  # (step, why), newest first
        for step in sorted(self.manager.all_steps(), reverse=True):
            restored, why = None, None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
            except Exception as e:  # Orbax wraps an unreadable array file in a bare Exception
                why = _unreadable(e)
                if why is None:
                    raise
            if not _all_processes(why is None):
                unreadable.append((step, why or "unreadable on another process"))
                continue
            if unreadable:
                self._set_aside(unreadable, step)
            self.step = step
            return restored.state, dict(restored.loader)
        raise CheckpointError(f"{self.manager.directory}: no checkpoint can be restored: "
                              + "; ".join(f"step {s}: {why}" for s, why in unreadable)
                              + " (to start over, choose another out_dir)")

    def _set_aside(self, unreadable: list[tuple[int, str]], used: int):
        """Move unreadable checkpoints to `out/unreadable_checkpoints/` (first process), and
        warn."""
        directory = Path(self.manager.directory)
        for step, why in unreadable:
            moved = self.out / "unreadable_checkpoints" / str(step)
            n = 1
            while moved.exists():
                moved, n = self.out / "unreadable_checkpoints" / f"{step}-{n}", n + 1
            log.warning("checkpoint %s cannot be read (%s); resuming from %s instead (the "
                        "unreadable one is moved to %s)", directory / str(step), why,
                        directory / str(used), moved)
            if jax.process_index() == 0:
                moved.parent.mkdir(exist_ok=True)
                os.replace(directory / str(step), moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("align_jax.Checkpoints.set_aside")
        self.manager.reload()

    def save(self, step: int, state, record: dict):
        """Save `state` and `record` as checkpoint `step`; a step already saved holds the same state
        (the final save after a periodic one) and is kept as it is."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        loader=ocp.args.JsonSave(record)),
                          force=True)
        self.manager.wait_until_finished()


def check_finite(metrics, step: int, batch: str):
    """Raise NonFiniteError when a step refused a non-finite update."""
    if np.any(gather_to_host(metrics["nonfinite"])):  # one flag per member of a sweep
        raise NonFiniteError(f"step {step}: non-finite loss or gradient on the batch at {batch} "
                             f"(loss {np.asarray(gather_to_host(metrics['loss'])).tolist()}); "
                             "params were not updated and the last checkpoint is intact")
