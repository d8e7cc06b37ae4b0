"""Generation throughput: align_jax's sampler vs transformers.generate on the SmolLM2-135M
architecture (random weights), same process, same thread count, plus the machine's matmul roofline.

Run: python experiments/benchmarks/generation.py [--batches 8 32] [--new-tokens 64] [--prompt 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine through JAX (the roofline)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def time_best(fn, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOLLM2_135M)).eval()
    model = load_pretrained(hf)
    params = sum(p.numel() for p in hf.parameters())
    peak = matmul_peak_gflops()
    print(f"SmolLM2-135M architecture, {params / 1e6:.0f}M params; torch threads {torch.get_num_threads()}, "
          f"JAX devices {jax.devices()}; measured fp32 matmul peak {peak:.0f} GFLOP/s")
    rows = []
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        ids = rng.integers(0, SMOLLM2_135M["vocab_size"], size=(batch, args.prompt))
        mask = np.ones_like(ids)
        config = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
        generate(model, ids, mask, jax.random.key(0), config).ids_BxN.block_until_ready()  # compile
        ours = time_best(lambda: generate(model, ids, mask, jax.random.key(0), config).ids_BxN.block_until_ready())

        def hf_generate():
            with torch.no_grad():
                hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

        theirs = time_best(hf_generate)
        new_tokens = batch * args.new_tokens
        flops_per_token = 2 * params  # matmul FLOPs of one decoded token (attention excluded)
        rows.append((batch, new_tokens / ours, new_tokens / theirs, theirs / ours,
                     new_tokens / ours * flops_per_token / 1e9 / peak))
    print("\n| batch | align_jax tokens/s | transformers tokens/s | speed-up | align_jax fraction of peak |")
    print("|---|---|---|---|---|")
    for batch, a, t, s, f in rows:
        print(f"| {batch} | {a:.0f} | {t:.0f} | {s:.1f}× | {100 * f:.1f}% |")


if __name__ == "__main__":
    main()
