"""One JAX compilation cache for the whole test session: many tests (and the training processes
they start) compile the same programs, the tiny models' SFT, DPO and sampler steps above all. The
controller creates the directory before xdist starts its workers, which inherit it through the
environment, as do the subprocesses the tests run; it is removed when the session ends, so every
session starts empty and nothing outlives it."""

import os
import shutil
import tempfile

CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    if CACHE in os.environ or hasattr(config, "workerinput"):
        return
    config.compilation_cache = tempfile.mkdtemp(prefix="align_jax_test_cache_")
    os.environ[CACHE] = config.compilation_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"


def pytest_unconfigure(config):
    if getattr(config, "compilation_cache", None):
        shutil.rmtree(config.compilation_cache, ignore_errors=True)
