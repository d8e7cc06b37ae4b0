"""Hyperparameter sweeps as one compiled program.

n members that differ only in one float of the loss config (DPO's β, SimPO's γ, KTO's λ_D, …)
are the lanes of `jax.vmap` over the ordinary pure step: step(stacked states, ref, batch) =
vmap_i step_{cfg with field = values[i]}(state_i, ref, batch). Their train states are stacked on a
new leading axis that is not sharded (each member is laid out on the mesh as a single state is);
the batch and the frozen parameters (reference, LoRA base) are shared, so the data pipeline runs
once, the program is compiled once, and a LoRA sweep holds one base for K members' adapters. On an
accelerator the n small updates fill the device together; on a CPU the
work is n times one member's, in one program.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from align_jax.config import ConfigError, LossConfig, RunConfig

# The float fields of LossConfig that the losses use only arithmetically (no Python branching), so
# they may be traced values.
SWEEPABLE = ("beta", "simpo_gamma", "rpo_alpha", "desirable_weight", "undesirable_weight",
             "center_coef")


def members(cfg: RunConfig) -> list[str] | None:
    """The members' names, `<field>=<value>` (also their output directories), or None without a
    sweep."""
    sweep = cfg.sweep
    if sweep.field is None:
        if sweep.values:
            raise ConfigError("sweep.values is set but sweep.field is not")
        return None
    if sweep.field not in SWEEPABLE:
        raise ConfigError(f"sweep.field must be one of {SWEEPABLE}, got {sweep.field!r}")
    if not sweep.values:
        raise ConfigError(f"sweep.values is empty: give the values of loss.{sweep.field} to train")
    names = [f"{sweep.field}={v:g}" for v in sweep.values]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep.values has repeated values: {list(sweep.values)}")
    return names


def stacked_shardings(shardings):
    """The shardings of a tree stacked on a new, unsharded leading axis."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), shardings)


def stack(tree, n: int, shardings):
    """n copies of `tree` on a new leading axis, created directly with `shardings` (stacked
    ones)."""
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t),
                   out_shardings=shardings)(tree)


def member(tree, i: int):
    """Member i of a stacked tree."""
    return jax.tree.map(lambda x: x[i], tree)


def vmap_step(make_step: Callable[[LossConfig], Callable], cfg: LossConfig, field: str,
              values) -> Callable:
    """A step over stacked states (or params): member i runs `make_step(cfg with field = values[i])`
    on its own lane, with the frozen parameters (reference, LoRA base) and the batch shared. The
    values are constants of the program; the step's signature is the unswept one's, so it is
    jitted the same way."""
    values = jnp.asarray(values, jnp.float32)

    def one(stacked, frozen, batch, value):
        return make_step(dataclasses.replace(cfg, **{field: value}))(stacked, frozen, batch)

    vmapped = jax.vmap(one, in_axes=(0, None, None, 0))
    return lambda stacked, frozen, batch: vmapped(stacked, frozen, batch, values)
