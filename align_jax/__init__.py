"""align_jax: aligning language models with pure, jitted JAX losses and functional trainers."""

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _quiet_absent_accelerators() -> None:
    """Keep JAX's accelerator plugins quiet on a host without their hardware.

    The `tpu` and `cuda` extras (for `align-jax plan`, which compiles for a TPU or GPU topology on
    any host) install libtpu and JAX's CUDA plugin. Without a chip, JAX still starts libtpu in every
    process (it prints warnings about TPU_ACCELERATOR_TYPE and takes libtpu's process lock) and
    the CUDA plugin's version check looks for a driver (it prints "Could not find cuda drivers").
    Where no NVIDIA GPU is visible, the version check is skipped, as there is nothing to check;
    where libtpu is installed but no TPU (PCI vendor 0x1ae0) and no GPU is visible, and
    JAX_PLATFORMS is unset, JAX is limited to the CPU. Compile-only devices need neither.
    """
    gpu = any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))
    if not gpu:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if gpu or os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(path) as f:
            if f.read().strip() == "0x1ae0":
                return
    os.environ["JAX_PLATFORMS"] = "cpu"
    # imported before align_jax: its config has read the environment already
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_quiet_absent_accelerators()
