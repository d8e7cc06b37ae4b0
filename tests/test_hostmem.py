"""`retain_freed_memory` makes a jitted step reuse its host temporaries instead of faulting in fresh
pages on every call. Each case runs in a fresh process: the malloc settings must precede JAX's
threads."""

import json
import os
import subprocess
import sys

from align_jax.hostmem import with_retained_memory

PROBE = """
import json, resource, sys
from align_jax.hostmem import retain_freed_memory
accepted = retain_freed_memory() if sys.argv[1] == "retain" else None
import jax, jax.numpy as jnp
x, w = jnp.ones((4096, 64)), jnp.full((64, 4096), 0.01)
step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))  # keeps a 64 MB activation for the backward
for _ in range(20):  # the heap settles in a few calls
    step(w, x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(w, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults_per_call": sorted(faults)[len(faults) // 2], "accepted": accepted}))
"""


def _probe(mode: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_retained_memory_is_reused_across_calls():
    """The median call's page faults: the heap may still grow once after the warm-up calls (one
    call in five faulted in a whole block in one run); by default every call does."""
    default, retained = _probe("default"), _probe("retain")
    from_start = _probe("default", with_retained_memory(dict(os.environ)))
    assert retained["accepted"] is True
    pages = 64 * 2**20 / 4096
    assert default["faults_per_call"] > pages / 2, default  # a fresh 64 MB block faulted in per call
    assert retained["faults_per_call"] < pages / 50, retained  # the same block reused
    assert from_start["faults_per_call"] < pages / 50, from_start


def test_tunables_are_appended_to_the_environment():
    assert with_retained_memory({})["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=1:")
    env = with_retained_memory({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "PATH": "/bin"})
    assert env["GLIBC_TUNABLES"].startswith("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1")
    assert env["PATH"] == "/bin"
