"""One JAX compilation cache for the whole test session: many tests (and the training processes
they start) compile the same programs, the tiny models' SFT, DPO and sampler steps above all. The
controller creates the directory before xdist starts its workers, which inherit it through the
environment, as do the subprocesses the tests run; it is removed when the session ends, so every
session starts empty and nothing outlives it.

On a machine with an NVIDIA GPU, the session (and what it starts) runs float32 matrix products
at float32 precision, not JAX's default TF32 (transformers' logits would differ by ~3e-4), and
XLA:GPU's scatter-adds (a mixture of experts' combine) in a fixed order, as some tests compare
runs bit for bit. (Not elsewhere: on the CPU float32 is already exact, and Mosaic cannot compile
splash attention's bf16 products at float32 precision for a TPU.)"""

import os
import shutil
import tempfile

CACHE = "JAX_COMPILATION_CACHE_DIR"
if os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   "--xla_gpu_deterministic_ops=true").strip()


def pytest_configure(config):
    if CACHE in os.environ or hasattr(config, "workerinput"):
        return
    config.compilation_cache = tempfile.mkdtemp(prefix="align_jax_test_cache_")
    os.environ[CACHE] = config.compilation_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"


def pytest_unconfigure(config):
    if getattr(config, "compilation_cache", None):
        shutil.rmtree(config.compilation_cache, ignore_errors=True)
