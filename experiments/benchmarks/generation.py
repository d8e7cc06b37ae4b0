"""Generation throughput: align_jax's sampler vs transformers.generate on the SmolLM2-135M
architecture (random weights), same thread count, plus the machine's matmul roofline.

Each library runs every case in a fresh process of its own, and the two take turns for `--rounds`
rounds (`experiments.benchmarks.rounds`); the table gives median throughputs over rounds and the
median of the same-round speed-ups, with their range.

Run: python -m experiments.benchmarks.generation [--batches 8 32] [--new-tokens 64] [--prompt 64]
     [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate
from experiments.benchmarks.rounds import alternate, measure
from experiments.benchmarks.smollm2 import (
    SMOLLM2_135M,
    matmul_peak_gflops,
    smollm2_hf,
    smollm2_parameter_count,
)


def weight_bandwidth_gbs(rows: int = 8192, cols: int = 16384, repeats: int = 5) -> float:
    """Measured rate (GB/s) at which a matrix-vector product streams float32 weights from memory:
    the roofline of a decode step whose batch is too small to be compute-bound."""
    w = jax.random.normal(jax.random.key(0), (rows, cols))
    x = jnp.ones((1, rows))
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(x, w)
    out.block_until_ready()
    return 4 * rows * cols * repeats / (time.perf_counter() - start) / 1e9


def time_best(fn, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cases(args) -> list[tuple[str, int, int, bool]]:
    """(label, prompts, samples per prompt, greedy) of each measured case."""
    prompts, samples = args.group
    return ([(f"{b} prompts, greedy", b, 1, True) for b in args.batches]
            + [(f"{prompts} prompts × {samples} samples, T=1", prompts, samples, False)])


def run_side(side: str, args) -> dict:
    """Per case, one library's best seconds for the whole generation (ours: and for the prefill
    alone, as a one-token generation), in this (fresh) process."""
    torch.manual_seed(0)
    hf = smollm2_hf().eval()
    model = load_pretrained(hf) if side == "ours" else None
    N, times = args.new_tokens, {}
    for label, batch, samples, greedy in cases(args):
        ids = np.random.default_rng(batch).integers(0, SMOLLM2_135M["vocab_size"],
                                                    size=(batch, args.prompt))
        mask = np.ones_like(ids)

        def ours(new_tokens=N):
            config = SamplingConfig(max_new_tokens=new_tokens, num_samples=samples, greedy=greedy)
            generate(model, ids, mask, jax.random.key(0), config).ids_BxC.block_until_ready()

        def theirs():
            with torch.no_grad():
                hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            do_sample=not greedy, num_return_sequences=samples, max_new_tokens=N,
                            min_new_tokens=N, pad_token_id=0, top_k=None, top_p=None)

        if side == "ours":
            ours(), ours(1)  # compile both programs
            times[label] = {"total": time_best(ours), "prefill": time_best(lambda: ours(1))}
        else:
            times[label] = {"total": time_best(theirs)}
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--group", type=int, nargs=2, default=[4, 8],
                        metavar=("PROMPTS", "SAMPLES"),
                        help="the GRPO-shaped case: PROMPTS prompts × SAMPLES sampled completions")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    # one measurement, as JSON
    parser.add_argument("--side", choices=["ours", "hf", "machine"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "machine":
        print(json.dumps({"peak": matmul_peak_gflops(), "bandwidth": weight_bandwidth_gbs()}))
        return
    if args.side is not None:
        print(json.dumps(run_side(args.side, args)))
        return

    module = "experiments.benchmarks.generation"
    shape = ["--batches", *map(str, args.batches), "--group", *map(str, args.group),
             "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt)]
    machine = measure(module, "machine")
    peak, bandwidth = machine["peak"], machine["bandwidth"]
    results = alternate(module, ["ours", "hf"], args.rounds, *shape)
    params = smollm2_parameter_count()
    embedding = SMOLLM2_135M["vocab_size"] * SMOLLM2_135M["hidden_size"]
    print(f"\nSmolLM2-135M architecture, {params / 1e6:.0f}M params; "
          f"{torch.get_num_threads()} threads; measured fp32 matmul peak {peak:.0f} GFLOP/s, "
          f"weight streaming {bandwidth:.1f} GB/s; {args.rounds} rounds, each "
          "library in its own process")
    print("\n| case | align_jax tokens/s | transformers tokens/s | speed-up, same round (range) "
          "| roofline tokens/s | align_jax % of roofline | align_jax prefill s "
          "| align_jax decode step ms |")
    print("|---|---|---|---|---|---|---|---|")
    N = args.new_tokens
    for label, batch, samples, _ in cases(args):
        ours = [r[label] for r in results["ours"]]
        hf = [r[label]["total"] for r in results["hf"]]
        speedups = [h / o["total"] for h, o in zip(hf, ours)]
        total, prefill = (np.median([o["total"] for o in ours]),
                          np.median([o["prefill"] for o in ours]))
        new_tokens = batch * samples * N
        # Roofline (matmuls only): prefill each prompt once at the matmul peak, then each decode
        # step at the slower of the matmul peak and streaming every weight once from memory.
        prefill_flops = 2 * (params - embedding) * batch * args.prompt + 2 * embedding * batch
        step_s = max(2 * params * batch * samples / (peak * 1e9), 4 * params / (bandwidth * 1e9))
        roofline = prefill_flops / (peak * 1e9) + (N - 1) * step_s
        print(f"| {label} | {new_tokens / total:.0f} | {new_tokens / np.median(hf):.0f} | "
              f"{np.median(speedups):.1f}× ({min(speedups):.1f}–{max(speedups):.1f}) | "
              f"{new_tokens / roofline:.0f} | {100 * roofline / total:.0f}% | {prefill:.2f} | "
              f"{(total - prefill) / (N - 1) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
