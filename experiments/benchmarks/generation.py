"""Generation throughput: align_jax's sampler vs transformers.generate on the SmolLM2-135M
architecture (random weights), same thread count, plus the machine's matmul roofline and what
its matmul kernels (XLA's and PyTorch's) make of a decode step's shapes.

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


def block_weights(batch: int):
    """SmolLM2-135M's 30 blocks' projection weights (q, k, v, o, gate, up, down) and a
    [batch, hidden] input: what one decode step multiplies, the LM head aside."""
    D, M = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["intermediate_size"]
    KV = D // SMOLLM2_135M["num_attention_heads"] * SMOLLM2_135M["num_key_value_heads"]
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, M), (D, M), (M, D)]
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, np.float32) * 0.02
               for _ in range(SMOLLM2_135M["num_hidden_layers"]) for s in shapes]
    return np.ones((batch, D), np.float32), weights


def matmul_chain(x, ws, silu):
    """The blocks' matmuls alone, as a decode step chains them (no attention, norms or RoPE)."""
    for i in range(0, len(ws), 7):
        q, k, v = x @ ws[i], x @ ws[i + 1], x @ ws[i + 2]
        x = x + (q + (k + v)[:, :1]) @ ws[i + 3]
        x = x + (silu(x @ ws[i + 4]) * (x @ ws[i + 5])) @ ws[i + 6]
    return x


def matmul_chain_ms(batch: int) -> dict[str, float]:
    """Best time (ms) of `matmul_chain` jitted by XLA and run eagerly by PyTorch: what the
    machine's matmul kernels make of a decode step's shapes."""
    x, ws = block_weights(batch)
    xla = jax.jit(lambda x, ws: matmul_chain(x, ws, jax.nn.silu))
    x_jax, ws_jax = jnp.asarray(x), [jnp.asarray(w) for w in ws]
    xla(x_jax, ws_jax).block_until_ready()
    x_pt, ws_pt = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]
    with torch.no_grad():
        return {"xla": 1e3 * time_best(lambda: xla(x_jax, ws_jax).block_until_ready(), 10),
                "torch": 1e3 * time_best(lambda: matmul_chain(x_pt, ws_pt,
                                                              torch.nn.functional.silu), 10)}


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
    # separate layers, as on any CPU (a scanned stack's decode step slices every layer's weights)
    model = load_pretrained(hf, scan_layers=False) if side == "ours" else None
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
        print(json.dumps({"peak": matmul_peak_gflops(), "bandwidth": weight_bandwidth_gbs(),
                          "chain": {b: matmul_chain_ms(b) for b in sorted(
                              {*args.batches, args.group[0] * args.group[1]})}}))
        return
    if args.side is not None:
        print(json.dumps(run_side(args.side, args)))
        return

    module = "experiments.benchmarks.generation"
    shape = ["--batches", *map(str, args.batches), "--group", *map(str, args.group),
             "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt)]
    machine = measure(module, "machine")
    peak, bandwidth, chain = machine["peak"], machine["bandwidth"], machine["chain"]
    results = alternate(module, ["ours", "hf"], args.rounds, *shape)
    params = smollm2_parameter_count()
    embedding = SMOLLM2_135M["vocab_size"] * SMOLLM2_135M["hidden_size"]
    print(f"\nSmolLM2-135M architecture, {params / 1e6:.0f}M params; "
          f"{torch.get_num_threads()} threads; measured fp32 matmul peak {peak:.0f} GFLOP/s, "
          f"weight streaming {bandwidth:.1f} GB/s; {args.rounds} rounds, each "
          "library in its own process")
    print("\n| case | align_jax tokens/s | transformers tokens/s | speed-up, same round (range) "
          "| roofline tokens/s | align_jax % of roofline | align_jax prefill s "
          "| align_jax decode step ms | its blocks' matmuls alone ms, XLA / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
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
              f"{(total - prefill) / (N - 1) * 1e3:.0f} | "
              f"{chain[str(batch * samples)]['xla']:.0f} / "
              f"{chain[str(batch * samples)]['torch']:.0f} |")


if __name__ == "__main__":
    main()
