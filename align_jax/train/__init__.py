"""Functional training: sharded train state, pure steps, method losses, and the host loop."""

from align_jax.train.host import NonFiniteError
from align_jax.train.mesh import LOGICAL_RULES, make_mesh, param_shardings, shard_batch
from align_jax.train.methods import METHODS
from align_jax.train.run import train
from align_jax.train.state import TrainState, init_train_state, make_optimizer
from align_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "LOGICAL_RULES",
    "METHODS",
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
