"""align_jax: aligning language models with pure, jitted JAX losses and functional trainers."""

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _skip_absent_tpu() -> None:
    """Keep JAX off the TPU runtime on a machine without a TPU.

    With libtpu installed (the `tpu` extra, for `align-jax plan`), JAX starts its TPU backend in
    every process, TPU or not; without a chip that prints warnings about TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES and takes libtpu's process lock. Where no Google TPU (PCI vendor 0x1ae0)
    and no NVIDIA GPU is visible and JAX_PLATFORMS is unset, JAX is limited to the CPU;
    compile-only TPU devices (`align_jax.plan`) do not need the backend.
    """
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    vendors = set()
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(path) as f:
            vendors.add(f.read().strip())
    if "0x1ae0" in vendors or any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before align_jax: its config has read the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_skip_absent_tpu()
