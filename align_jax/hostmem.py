"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

XLA:CPU allocates each jitted step's temporaries as one block (1.96 GB for the DPO step on the
SmolLM2-135M architecture, 4 pairs × 128 tokens) with `posix_memalign`, from whichever worker
thread runs the step. glibc serves a block that large from its own `mmap` and `munmap`s it on
free, so every step faults in and zeroes ~500 000 fresh pages: about 1.5 s of kernel time per
step on 2 cores. With one malloc arena and `mmap` off, the block comes from the main heap, stays
there when freed, and the next step reuses it (0 page faults; measured in
`experiments/benchmarks/dpo_step.py`). The price is that the process keeps its peak heap size.

`retain_freed_memory()` must run before JAX starts its thread pool (before the first JAX
computation): a thread keeps the arena it got on its first allocation. The CLI calls it first
thing; scripts call it at the top. It is a no-op where the C library has no `mallopt` (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """One malloc arena, no per-allocation mmap, and no trimming of the heap's top (a threshold of
    -1 turns trimming off, see mallopt(3)). Returns whether the C library accepted all three."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
