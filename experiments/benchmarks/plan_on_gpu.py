"""Does `align-jax plan` tell the truth about a real GPU? On a host with an NVIDIA GPU, for each
run below (Llama-3.2-1B DPO, 8 pairs × 1024 tokens, bf16 compute on float32 masters, one GPU):

- **planned**: `plan(cfg, "h100:1")`, compiled from the H100's description with no GPU needed: the
  compiler's peak (arguments + outputs − donated + temporaries + code) and the roofline step time;
- **local compile**: the same train step compiled by the local GPU's XLA, and its peak;
- **measured**: the step run on random weights and a batch of random tokens laid out as packed
  pairs (the step has no data-dependent control flow, so neither its memory nor its time depends
  on the values): the allocator's `peak_bytes_in_use`, which holds the state, the frozen
  reference, the batch and the step's temporaries, and the median time of `--steps` steps after
  one warm-up step; the MFU is the model's FLOPs (plan's count, no recomputation) over that
  time's worth of the chip's dense bf16 peak.

Each run is measured in its own process, so one run's peak does not hide the next one's. Writes
experiments/results/plan_on_gpu.md.

    python -m experiments.benchmarks.plan_on_gpu [--steps 5] [--runs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.config import ConfigError
from align_jax.data import PackedPairs
from align_jax.models import read_config
from align_jax.plan import cost_variants, matmul_cost, offline_specs, plan
from align_jax.topology import CHIPS, GiB
from align_jax.train.mesh import make_mesh
from experiments.benchmarks.plan_table import DPO, DPO_1B, run_config

ROOT = Path(__file__).parents[2]
MODEL = "llama-3.2-1b"
RUNS = [  # (what, overrides on Llama-3.2-1B DPO 8 × 1024)
    ("remat full, cuDNN attention", [*DPO_1B, "model.remat=full", "model.logits_chunk=256",
                                     "model.attention=cudnn"]),
    ("remat full, XLA attention", [*DPO_1B, "model.remat=full", "model.logits_chunk=256"]),
]


def realize(abstract, std: float = 0.02, seed: int = 0):
    """Arrays with the shapes, dtypes and shardings of `abstract`, made on the devices: floats
    N(0, std²), other leaves zero."""
    leaves, treedef = jax.tree.flatten(abstract)

    def make():
        key = jax.random.key(seed)
        return [std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype)
                for i, x in enumerate(leaves)]

    return jax.tree.unflatten(treedef, jax.jit(make, out_shardings=[x.sharding for x in leaves])())


def packed_pairs(abstract: PackedPairs, vocab_size: int, seed: int = 0) -> PackedPairs:
    """Rows [prompt | chosen | rejected | pad] of T = 2L slots as the batcher lays them out, with
    random tokens: a prompt and two completions of L/2 tokens each."""
    (B, T), (_, _, C) = abstract.ids_BxT.shape, abstract.labels_Bx2xC.shape
    P = C1 = C2 = T // 4
    ids = np.random.default_rng(seed).integers(0, vocab_size, (B, T), np.int32)
    slots = np.arange(T)
    segments = np.where(slots < P, 0, np.where(slots < P + C1, 1, 2)).astype(np.int32)
    k = np.arange(C)
    index = np.stack([P - 1 + k, np.where(k == 0, P - 1, P + C1 + k - 1)]).clip(0, T - 1)
    labels = np.stack([ids[:, P:][:, :C], ids[:, P + C1:][:, :C]], axis=1)
    arrays = dict(ids_BxT=ids, attention_mask_BxT=np.broadcast_to(slots < P + C1 + C2, (B, T)),
                  segment_ids_BxT=np.broadcast_to(segments, (B, T)),
                  logit_index_Bx2xC=np.broadcast_to(index, (B, 2, C)), labels_Bx2xC=labels,
                  label_mask_Bx2xC=np.broadcast_to(k < C1, (B, 2, C)))
    return abstract._replace(**{name: jax.device_put(np.ascontiguousarray(x, getattr(
        abstract, name).dtype), getattr(abstract, name).sharding) for name, x in arrays.items()})


def peak_bytes(memory) -> int:
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)


def measure(overrides: list[str], steps: int) -> dict:
    """One run on the local device: planned, compiled and measured figures."""
    cfg = run_config(MODEL, DPO, overrides)
    try:
        planned = plan(cfg, "h100:1").programs[0]
    except ConfigError as e:  # no target description for this CUDA plugin: measure regardless
        print(f"plan h100:1: {e}", file=sys.stderr)
        planned = None
    device = jax.devices()[0]
    mesh = make_mesh(1, 1, 1, devices=[device])
    spec = offline_specs(cfg, mesh)[0]
    counted, model = cost_variants(cfg)
    flops, accessed = matmul_cost(offline_specs(counted, mesh)[0])
    model_flops, _ = matmul_cost(offline_specs(model, mesh)[0])
    start = time.perf_counter()
    compiled = spec.fn.lower(*spec.args).compile()
    compile_seconds = time.perf_counter() - start
    state, frozen, batch = spec.args
    # random weights; AdamW's state, the step and the key as at the start of a run
    state = state._replace(params=realize(state.params), opt_state=realize(state.opt_state, 0.0),
                           step=realize(state.step), rng=realize(state.rng))
    frozen = realize(frozen)
    batch = packed_pairs(batch, read_config(cfg.model.path).vocab_size)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    chip = CHIPS.get(device.device_kind)
    return dict(device=device.device_kind,
                planned_peak=None if planned is None else planned.peak_bytes,
                planned_roofline=None if planned is None else planned.roofline_seconds,
                compiled_peak=peak_bytes(compiled.memory_analysis()),
                compile_seconds=compile_seconds,
                measured_peak=(device.memory_stats() or {}).get("peak_bytes_in_use"),
                step_seconds=statistics.median(times[1:]), model_flops=model_flops,
                roofline=None if chip is None else max(flops / chip.peak_flops,
                                                       accessed / chip.hbm_bandwidth),
                peak_flops=None if chip is None else chip.peak_flops,
                loss_finite=bool(jnp.isfinite(metrics["loss"])))


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f}"


def row(what: str, r: dict) -> str:
    mfu = "-" if r["peak_flops"] is None else (
        f"{r['model_flops'] / (r['step_seconds'] * r['peak_flops']):.0%}")
    roofline, planned = ("-" if x is None else f"{x:.3f}"
                         for x in (r["roofline"], r["planned_roofline"]))
    return (f"| {what} | {gib(r['planned_peak'])} | {gib(r['compiled_peak'])} | "
            f"{gib(r['measured_peak'])} | {planned} | {roofline} | "
            f"{r['step_seconds']:.3f} | {mfu} | {r['compile_seconds']:.0f} |")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--runs", type=int, default=len(RUNS), help="only the first N runs")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/plan_on_gpu.md"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(RUNS[args.one][1], args.steps)))
        return
    lines = []
    for i, (what, _) in enumerate(RUNS[:args.runs]):
        child = subprocess.run([sys.executable, "-m", "experiments.benchmarks.plan_on_gpu",
                                "--one", str(i), "--steps", str(args.steps)],
                               capture_output=True, text=True, cwd=ROOT, env=os.environ)
        if child.returncode:
            print(child.stderr[-3000:], file=sys.stderr)
            lines.append(f"| {what} | failed: {child.stderr.strip().splitlines()[-1][:200]} |")
        else:
            result = json.loads(child.stdout.strip().splitlines()[-1])
            if not lines:
                lines += [f"Device: {result['device']}, one GPU; {args.steps} timed steps.\n",
                          "| run | planned peak GiB (h100:1) | local compile GiB | measured peak "
                          "GiB | planned roofline s (H100) | roofline s (this GPU) | measured "
                          "step s | MFU | compile s |", "|" + "---|" * 9]
            lines.append(row(what, result))
            if not result["loss_finite"]:
                lines[-1] += " (loss not finite)"
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
