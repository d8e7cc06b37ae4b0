"""Side-by-side timing that is fair to both sides: each measurement runs in a fresh process of its
own, and the sides take turns for several rounds.

A side that ran first in a shared process would leave the next one its thread pools and heap (TRL's
DPO step measured 11.4 s alone and 15.3 s after align_jax in one process), and a shared machine's
speed drifts by ±20% within minutes, which alternating spreads over both sides; comparing each side
with the reference run of the same round cancels most of that drift. Every process starts with the
malloc settings of `align_jax.hostmem` (as glibc tunables), so both sides run with the same
allocator (they do not slow TRL: 11.6 and 12.3 s/step with them, 12.3 and 14.8 s without).

A benchmark module takes a hidden `--side NAME` argument, measures that one side in the process and
prints its result as JSON on its last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from align_jax.hostmem import with_retained_memory


def measure(module: str, side: str, *args: str):
    """Run `python -m module --side side *args` in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", module, "--side", side, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=with_retained_memory(dict(os.environ)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(module: str, sides, rounds: int, *args: str) -> dict[str, list]:
    """Each side's result in each round, the sides measured in turn within a round."""
    results = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides:
            results[side].append(measure(module, side, *args))
            print(f"round {r + 1}: {side} {_rounded(results[side][-1])} s", flush=True)
    return results


def _rounded(result):
    if isinstance(result, dict):
        return {k: _rounded(v) for k, v in result.items()}
    return round(result, 3)


def same_round_ratios(seconds: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Each side's time over the reference's time of the same round."""
    return {side: [t / ref for t, ref in zip(times, seconds[reference])]
            for side, times in seconds.items()}


def spread(values, unit: str = "") -> str:
    """'median (min–max)' of a list of figures, the median followed by `unit`."""
    return f"{np.median(values):.2f}{unit} ({min(values):.2f}–{max(values):.2f})"
