"""Compile-only accelerators: the devices of a TPU slice or GPU node that XLA compiles for on any
host, and the published figures of their chips.

TPU: any topology name libtpu accepts (`v5e:2x2`, `v5p:2x2x2`, `v6e:2x4`, …), with libtpu from
the `tpu` extra. GPU: `h100:8` (one node of 8 H100 SXM) or `h100:2x8` (2 nodes), with JAX's CUDA
plugin and `ptxas` from the `cuda-plan` extra; XLA compiles from the GPU's description in
`targets/h100_sxm.txtpb` instead of a driver.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from align_jax.config import ConfigError

GiB = 2**30


class Chip(NamedTuple):
    """Published per-chip figures: HBM bytes, dense bf16 FLOP/s, HBM bytes/s."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# device_kind -> chip (cloud.google.com/tpu/docs/system-architecture, NVIDIA's H100 and H200
# datasheets)
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1.2e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 8.19e11),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2.765e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1.64e12),
    "NVIDIA H100 80GB HBM3": Chip("h100", 84_942_979_072, 989e12, 3.35e12),
    "NVIDIA H200": Chip("h200", 141 * 10**9, 989e12, 4.8e12),
}
GPU_TARGETS = {"h100": "h100_sxm.txtpb"}


class Target(NamedTuple):
    """Compile-only devices, their chip, and each device's share of a chip (½ where a TPU chip
    shows its two cores as two devices)."""

    name: str
    devices: list
    device_kind: str
    chip: Chip
    share: float


def _tpu_devices(name: str) -> list:
    from jax.experimental import topologies

    # compile-only: share libtpu with other processes
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # libtpu missing, or a name it does not know
        raise ConfigError(f"--topology {name!r}: {str(e).splitlines()[0]} (TPU topologies need "
                          "the tpu extra: pip install 'align_jax[tpu]')") from None


def _gpu_devices(name: str, gpu: str, nodes: int, per_node: int) -> list:
    from jax.experimental import topologies

    description = (Path(__file__).parent / "targets" / GPU_TARGETS[gpu]).read_text()
    try:
        return list(topologies.get_topology_desc(platform="cuda", topology=f"1x{nodes}x{per_node}",
                                                 target_config=description).devices)
    except Exception as e:  # the CUDA plugin missing
        raise ConfigError(f"--topology {name!r}: {str(e).splitlines()[0]} (GPU topologies need "
                          "the cuda-plan extra: pip install 'align_jax[cuda-plan]')") from None


def target(name: str) -> Target:
    """The compile-only devices of topology `name` (see the module docstring)."""
    gpu = re.fullmatch(r"([a-z]\d+):(?:(\d+)x)?(\d+)", name)
    if gpu and gpu.group(1) in GPU_TARGETS:
        nodes, per_node = int(gpu.group(2) or 1), int(gpu.group(3))
        devices, chips = _gpu_devices(name, gpu.group(1), nodes, per_node), nodes * per_node
    else:
        devices = _tpu_devices(name)
        chips = math.prod(int(d) for d in name.split(":")[-1].split("x"))
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ConfigError(f"--topology {name!r}: no HBM and FLOP/s figures for {kind!r}; "
                          f"known: {sorted(CHIPS)}")
    return Target(name, devices, kind, CHIPS[kind], chips / len(devices))
