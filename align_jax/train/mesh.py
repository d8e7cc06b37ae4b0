"""The device mesh and the one place where logical axis names become mesh axes.

Mesh axes: `data` (replicas that split the batch), `fsdp` (also splits the batch, and shards
parameters and optimizer state), `expert` (splits the batch, and holds a share of each MoE
layer's experts: expert parallelism, `models.moe`), `tensor` (shards heads and MLP width inside
each layer). Batches are split over ("data", "fsdp", "expert"); a parameter dimension whose
logical name maps to a mesh axis is sharded over it when its size divides evenly, else
replicated with a warning. Between blocks, the decoder's activations are pinned to the batch
sharding (`activation_sharding`).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
LOGICAL_RULES = {  # logical axis name (models/decoder.py) -> mesh axis
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "expert": "expert",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *,
              expert: int = 1) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all devices of all processes; -1 takes what is
    left."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, expert, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or devices.size % known:
        raise ValueError(f"mesh data={data} fsdp={fsdp} expert={expert} tensor={tensor} does not "
                         f"fit {devices.size} devices")
    sizes = [devices.size // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {devices.size}")
    return Mesh(devices.reshape(sizes), AXES)


def _spec(name: str, logical: tuple, shape: tuple[int, ...], mesh: Mesh, rules: dict) -> P:
    axes = []
    for dim, (logical_name, size) in enumerate(zip(logical, shape)):
        axis = rules.get(logical_name)
        if axis is not None and size % mesh.shape[axis]:
            warnings.warn(f"parameter {name}: dimension {dim} ({logical_name!r}, size {size}) does "
                          f"not divide over mesh axis {axis!r} ({mesh.shape[axis]} devices); it is "
                          f"replicated there", stacklevel=4)
            axis = None
        axes.append(axis)
    return P(*axes)


def param_shardings(abstract_state: nnx.State, mesh: Mesh,
                    rules: dict = LOGICAL_RULES) -> nnx.State:
    """A NamedSharding per parameter, from the logical names in its `out_sharding` metadata.

    A dimension whose size does not divide its mesh axis is replicated, with a warning naming the
    parameter."""
    def sharding(path, spec, x):
        name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
        return NamedSharding(mesh, _spec(name, tuple(spec), x.shape, mesh, rules))

    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map_with_path(sharding, specs, abstract_state,
                                  is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Rows split over the batch axes; `stacked`: the rows of a sweep's members [K, B, …]."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """The decoder's [B·T, D] activations between blocks: rows split like the batch, D whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(host_batch, mesh: Mesh, stacked: bool = False):
    """This process's rows of a batch (NumPy; `stacked`: [K, B, …], a sweep's members) → global
    arrays split over the batch axes."""
    sharding = batch_sharding(mesh, stacked)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        host_batch)
