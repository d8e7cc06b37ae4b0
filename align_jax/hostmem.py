"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

XLA:CPU allocates each jitted step's temporaries as one block (1.96 GB for the DPO step on the
SmolLM2-135M architecture, 4 pairs × 128 tokens) with `posix_memalign`, from whichever worker
thread runs the step. glibc serves a block that large from its own `mmap` and `munmap`s it on
free, so every step faults in and zeroes ~500 000 fresh pages: about 1.5 s of kernel time per
step on 2 cores. With one malloc arena and `mmap` off, the block comes from the main heap, stays
there when freed, and the next step reuses it (0 page faults; measured in
`experiments/benchmarks/dpo_step.py`). The price is that the process keeps its peak heap size.

`retain_freed_memory()` applies this to the running process and should come before JAX starts its
threads and before large allocations: called after heavy imports, the heap needs a few steps to
settle (2 steps still faulted in ~500 000 pages each). The CLI calls it before its other imports;
scripts call it at the top. `with_retained_memory(env)` gives the same settings to a process about
to start, through glibc's tunables, where they hold from its first allocation. Both are no-ops
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# the same settings as glibc tunables for a new process (the largest trim threshold turns trimming
# off)
TUNABLES = (f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            f"glibc.malloc.trim_threshold={2**63 - 1}")


def retain_freed_memory() -> bool:
    """One malloc arena, no per-allocation mmap, and no trimming of the heap's top (a threshold of
    -1 turns trimming off, see mallopt(3)). Returns whether the C library accepted all three."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def with_retained_memory(env: dict[str, str]) -> dict[str, str]:
    """A copy of the environment `env` whose GLIBC_TUNABLES also carry `TUNABLES`."""
    tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLES]))
    return {**env, "GLIBC_TUNABLES": tunables}
