"""Functional training: sharded train state, pure steps, method losses, and the two host loops
(`offline.py`, `rl.py`) on a shared `session.Session`."""

from __future__ import annotations

from align_jax.config import ConfigError, RunConfig
from align_jax.train.host import NonFiniteError
from align_jax.train.mesh import LOGICAL_RULES, make_mesh, param_shardings, shard_batch
from align_jax.train.methods import METHODS
from align_jax.train.offline import train_offline
from align_jax.train.online import ONLINE_METHODS
from align_jax.train.rl import train_online
from align_jax.train.state import TrainState, init_train_state, make_optimizer
from align_jax.train.step import make_eval_step, make_train_step


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
          max_updates: int | None = None) -> dict:
    """Run `cfg` to `train.steps` updates (rollouts for the online methods); return the last
    metrics (for a sweep, {member name: its last metrics}).

    SIGTERM or Ctrl-C, or `max_updates` updates made by this call (a time-boxed slice of a long
    run), end it early with a checkpoint that `resume=True` continues exactly (with
    `rl.async_rollouts`, the rollout sampled ahead is not checkpointed: a resumed run samples it
    again, with the restored policy).

    A step whose loss or gradient is not finite raises NonFiniteError naming the step. The step
    refused the update, so the state is still that of the step before; the checkpoints written
    before it are kept (an offline run also checkpoints that state, with the data position before
    the bad batch). `resume=True` retries, e.g. with a lower `train.lr`, one of the
    `host.RESUMABLE` keys that may change on resume.
    """
    method = cfg.train.method
    if method in ONLINE_METHODS:
        return train_online(cfg, resume=resume, progress=progress, max_updates=max_updates)
    if method in METHODS:
        return train_offline(cfg, resume=resume, progress=progress, max_updates=max_updates)
    raise ConfigError(f"train.method must be one of {sorted(METHODS) + sorted(ONLINE_METHODS)}, "
                      f"got {method!r}")


__all__ = [
    "LOGICAL_RULES",
    "METHODS",
    "ONLINE_METHODS",
    "NonFiniteError",
    "TrainState",
    "init_train_state",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "param_shardings",
    "shard_batch",
    "train",
]
