"""Hyperparameter and seed sweeps as one compiled program.

n members that differ only in one float of the loss config (DPO's β, SimPO's γ, KTO's λ_D, …) or,
for the online methods, of `rl` (GRPO's β, ε, PPO's KL coefficient, …) or in the seed of their
sampling, mini-batch shuffling and prompt order (their initial state is shared) are the lanes of
`jax.vmap` over the ordinary pure programs: step(stacked states, frozen, batch) =
vmap_i step_{cfg with field = values[i]}(state_i, frozen, batch). Their train states are stacked on
a new leading axis that is not sharded (each member is laid out on the mesh as a single state is);
the frozen parameters (reference, LoRA base, reward model) are shared, so a LoRA sweep holds one
base for K members' adapters, and the program is compiled once. An offline sweep shares its
batches too; an online sweep's members sample, are scored and update on their own rollouts (a
seed sweep's members also draw their own prompts), in one vmapped sampler and one vmapped update.
On an accelerator the n small updates fill the device together; on a CPU the work is n times one
member's, in one program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from align_jax.config import ConfigError, RunConfig

# The float fields of LossConfig that the losses use only arithmetically (no Python branching), so
# they may be traced values (an online method's are its `online.OnlineMethod.sweepable`).
SWEEPABLE = ("beta", "simpo_gamma", "rpo_alpha", "desirable_weight", "undesirable_weight",
             "center_coef")


def members(cfg: RunConfig, sweepable: tuple[str, ...] = SWEEPABLE) -> list[str] | None:
    """The members' names, `<field>=<value>` (also their output directories), or None without a
    sweep; `sweepable`: the fields the method may sweep."""
    sweep = cfg.sweep
    if sweep.field is None:
        if sweep.values:
            raise ConfigError("sweep.values is set but sweep.field is not")
        return None
    if sweep.field not in sweepable:
        raise ConfigError(f"sweep.field must be one of {sweepable} for train.method="
                          f"{cfg.train.method}, got {sweep.field!r}")
    if not sweep.values:
        raise ConfigError(f"sweep.values is empty: give the values of {sweep.field} to train")
    if sweep.field == "seed" and any(v != int(v) or v < 0 for v in sweep.values):
        raise ConfigError(f"sweep.values: seeds are non-negative integers, got "
                          f"{list(sweep.values)}")
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


def vmap_members(make: Callable[[Any], Callable], cfg, field: str, values,
                 in_axes: tuple) -> Callable:
    """A program over the members: member i runs `make(cfg with field = values[i])` on its lane
    of the arguments mapped by `in_axes` (None: shared). A field that is not one of `cfg`'s (a
    seed) changes the arguments only. The values are constants of the program; its signature is
    one member's, so it is jitted the same way."""
    if field not in {f.name for f in dataclasses.fields(cfg)}:
        return jax.vmap(make(cfg), in_axes=in_axes)
    values = jnp.asarray(values, jnp.float32)

    def one(*args):
        *args, value = args
        return make(dataclasses.replace(cfg, **{field: value}))(*args)

    vmapped = jax.vmap(one, in_axes=(*in_axes, 0))
    return lambda *args: vmapped(*args, values)
