"""What every run has, offline or online: its output directory and config record, the device
mesh, the tokenizer, the data, the checkpoints, the loop's stop signal and progress bar, and the
export of the trained model. The two host loops (`offline.py`, `rl.py`) open a Session and add
only what their method does.

Outputs under `out_dir`: `config.yaml`, `metrics.jsonl` (one JSON object per logged step, with
`split` train or eval), TensorBoard event files in `tb/`, Orbax checkpoints in `checkpoints/`
(train state with its rng, and a side record: the data iterator's position, an online run's KL
controller; the last `keep_checkpoints` kept), and the final model as a Hugging Face directory in
`model/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from align_jax.config import ConfigError, RunConfig
from align_jax.data import encode, truncate
from align_jax.train.host import (
    Checkpoints,
    StopSignal,
    data_source,
    load_tokenizer,
    record_config,
)
from align_jax.train.mesh import make_mesh, shard_batch
from align_jax.train.models import export
from align_jax.train.online import ONLINE_METHODS

log = logging.getLogger(__name__)


def meshes(cfg: RunConfig) -> tuple[Mesh, Mesh | None]:
    """(the trainer's mesh, the sampler's or None): with `rl.sampler_devices` = n, the last n
    devices form a data-parallel sampler mesh (each holds the whole policy and samples its share
    of the prompts) and the `mesh` axes split the others."""
    devices, n = jax.devices(), cfg.rl.sampler_devices
    if n == 0 or cfg.train.method not in ONLINE_METHODS:
        return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                         expert=cfg.mesh.expert), None
    if not 0 < n < len(devices):
        raise ConfigError(f"rl.sampler_devices={n}: expected 0, or fewer than the "
                          f"{len(devices)} devices")
    if jax.process_count() > 1:
        raise ConfigError("rl.sampler_devices: a sampler mesh of its own is for single-process "
                          "runs")
    if cfg.train.batch_size % n:
        raise ConfigError(f"rl.sampler_devices={n} does not divide train.batch_size="
                          f"{cfg.train.batch_size} (the sampler splits the prompts)")
    try:
        trainer = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices[:-n],
                            expert=cfg.mesh.expert)
    except ValueError as e:
        raise ConfigError(f"mesh: {e} (rl.sampler_devices={n} of them sample)") from None
    return trainer, make_mesh(devices=devices[-n:])


@dataclasses.dataclass
class Session:
    cfg: RunConfig
    out: Path
    mesh: Mesh
    tokenizer: Any
    pad_id: int
    checkpoints: Checkpoints
    sampler_mesh: Mesh | None = None  # an online run's sampler devices, when set apart

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> Session:
        """Create `out_dir`, check a resumed config against the recorded one (`record_config`),
        and build the mesh (and with `rl.sampler_devices` the sampler's), the tokenizer and the
        checkpoint manager."""
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record_config(out, cfg, resume)
        mesh, sampler_mesh = meshes(cfg)
        tokenizer = load_tokenizer(cfg.tokenizer)
        pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                  else tokenizer.eos_token_id)
        return cls(cfg, out, mesh, tokenizer, pad_id,
                   Checkpoints(out, cfg.train.keep_checkpoints, resume), sampler_mesh)

    @property
    def primary(self) -> bool:
        """The first process: the one that writes logs and exports."""
        return jax.process_index() == 0

    def load_data(self, kind: str, tools: list[dict] | None = None):
        """(train, eval or None): encoded (conversational prompts with the JSON schemas of
        `tools`), validated for the method's `kind`, truncated with counts; eval is `data.eval`,
        a fresh draw of the synthetic task, or `data.eval_fraction` of the train rows."""
        cfg = self.cfg
        limit = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)

        def load(path, seed_offset):
            return truncate(encode(data_source(path, cfg, seed_offset), self.tokenizer,
                                   kind=kind, tools=tools), **limit)

        train = load(cfg.data.train, 0)
        if cfg.data.eval is not None or (cfg.data.synthetic and cfg.data.eval_fraction == 0
                                         and (cfg.train.eval_every or cfg.train.eval_on_start)):
            return train, load(cfg.data.eval, 1000)
        if cfg.data.eval_fraction > 0:
            order = np.random.default_rng(cfg.train.seed).permutation(len(train.examples))
            held = max(1, int(cfg.data.eval_fraction * len(order)))
            pick = lambda idx: dataclasses.replace(  # noqa: E731
                train, examples=[train.examples[i] for i in sorted(idx)])
            return pick(order[held:]), pick(order[:held])
        return train, None

    def place(self, tree, stacked: bool = False):
        """Host arrays of a global batch (the same on every process; `stacked`: [K, B, …], a
        sweep's members) → this process's rows, placed on the mesh as one global array split
        over the batch axes."""
        count, index, axis = jax.process_count(), jax.process_index(), int(stacked)

        def mine(x):
            n = x.shape[axis] // count
            return np.asarray(x).take(np.arange(index * n, (index + 1) * n), axis=axis)

        return shard_batch(jax.tree.map(mine, tree), self.mesh, stacked)

    @contextlib.contextmanager
    def loop(self, start: int, *, progress: bool, max_updates: int | None, unit: str):
        """(stop signal, progress bar, the step to stop at): `train.steps`, or `max_updates` after
        `start` when that comes first; SIGTERM / Ctrl-C set the signal."""
        steps = self.cfg.train.steps
        stop_at = steps if max_updates is None else min(steps, start + max_updates)
        with StopSignal().installed() as stop, \
                tqdm(total=steps, initial=start, disable=not (progress and self.primary),
                     desc=self.cfg.train.method, unit=unit) as bar:
            yield stop, bar, stop_at

    def finished(self, step: int, unit: str) -> bool:
        """Whether the run reached `train.steps`; if not, say how to continue it."""
        if step < self.cfg.train.steps:
            log.warning("stopped at %s %d of %d: checkpoint written, continue with --resume", unit,
                        step, self.cfg.train.steps)
            return False
        return True

    def export(self, model, directory: Path | None = None, name: str = "model") -> None:
        """`model` as a Hugging Face directory `<directory or out_dir>/<name>/` (first process
        only; every process must have gathered the parameters)."""
        if self.primary:
            export(self.cfg, model, directory or self.out, self.tokenizer, name=name)
