"""What the host loops of offline (`run.py`) and online (`rl.py`) training share: tokenizers,
data sources, models, gathers, signals, metric logs and Orbax checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from align_jax.config import ConfigError, RunConfig
from align_jax.data import DataError, synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import Decoder, DecoderConfig, load_pretrained


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


def load_tokenizer(spec: str):
    if spec == "tiny":
        return tiny_tokenizer()
    path = Path(spec)
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(spec)


def data_source(path: str | None, cfg: RunConfig, seed_offset: int):
    """A dataset file, or the config's synthetic task drawn with seed + `seed_offset`."""
    if path is not None:
        return path
    if cfg.data.synthetic is None:
        raise DataError("config: set data.train (a dataset file) or data.synthetic (a task name)")
    if cfg.data.synthetic not in synthetic.TASKS:
        raise DataError(f"config: data.synthetic {cfg.data.synthetic!r} is not one of {sorted(synthetic.TASKS)}")
    args = dict(cfg.data.synthetic_args)
    args["seed"] = args.get("seed", 0) + seed_offset
    return synthetic.TASKS[cfg.data.synthetic](**args)


def build_model(cfg: RunConfig, *, with_scalar_head: bool = False, path: str | None = None):
    """(make_model, pretrained params or None): a model's constructor (the config's dtype and remat)
    and its starting weights, from `path` (default `model.path`) or `model.init` from scratch."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    pretrained = None
    path = path or cfg.model.path
    if path is not None:
        loaded = load_pretrained(path)
        config, pretrained = loaded.config, nnx.split(loaded)[1]
    else:
        config = DecoderConfig.from_hf(transformers.LlamaConfig(**cfg.model.init))
    return (lambda rngs: Decoder(config, rngs=rngs, dtype=dtype, remat=cfg.model.remat,
                                 with_scalar_head=with_scalar_head)), pretrained


def to_host(tree):
    """Global arrays (sharded over devices of every process) → full NumPy arrays on each host."""
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


def wandb_run(out: Path, cfg: RunConfig):
    """The Weights & Biases run of `out` (named after it), continued when `out` has logged to one
    before: its id is kept in `out/wandb_run_id`, so `--resume` logs on to the same run."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project needs the wandb package: pip install 'align_jax[wandb]'") from None
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.train.wandb_project, id=run_id, name=out.name, dir=str(out), resume="allow",
                      config=dataclasses.asdict(cfg))


class MetricLog:
    """`metrics.jsonl` (one object per logged step, with its `split`), TensorBoard events in `tb/`
    and, with `train.wandb_project`, a W&B run, written by the first process only."""

    def __init__(self, out: Path, cfg: RunConfig):
        from tensorboardX import SummaryWriter

        self.primary = jax.process_index() == 0
        self.writer = SummaryWriter(str(out / "tb")) if self.primary else None
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


class Checkpoints:
    """Orbax checkpoints of the train state (with its rng) and a JSON side record (data position,
    controller state), the last `keep` kept. Starting over existing checkpoints without `resume`
    is refused, so a run is never silently overwritten."""

    def __init__(self, out: Path, keep: int, resume: bool):
        self.manager = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep))
        latest = self.manager.latest_step()
        if not resume and latest is not None:
            raise ConfigError(f"{out}: holds checkpoints up to step {latest}; continue them with "
                              "--resume (resume=True) or choose another out_dir")
        self.resume = resume and latest is not None

    def restore(self, state, shardings) -> tuple[Any, dict] | None:
        """(state, side record) of the latest checkpoint when resuming, else None."""
        if not self.resume:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        restored = self.manager.restore(self.manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
        return restored.state, dict(restored.loader)

    def save(self, step: int, state, record: dict):
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        loader=ocp.args.JsonSave(record)), force=True)
        self.manager.wait_until_finished()


def check_finite(metrics, step: int, batch: str):
    """Raise NonFiniteError when a step refused a non-finite update."""
    if np.any(to_host(metrics["nonfinite"])):  # one flag per member of a sweep
        raise NonFiniteError(f"step {step}: non-finite loss or gradient on the batch at {batch} (loss "
                             f"{np.asarray(to_host(metrics['loss'])).tolist()}); params were not updated "
                             "and the last checkpoint is intact")
