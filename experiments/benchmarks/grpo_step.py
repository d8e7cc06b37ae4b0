"""GRPO step time, split by phase: align_jax vs TRL's GRPOTrainer on the SmolLM2-135M architecture
(random weights), 4 prompts × 8 samples × 64 new tokens, same thread count.

One step = generation (KV-cache sampling of 32 completions of exactly 64 tokens: random weights
never emit EOS), scoring (a rule reward on the decoded texts), and one update (μ = 1, β = 0, the
clipped surrogate over the 32 sequences of 64 prompt + 64 completion tokens, AdamW, fp32, no
gradient checkpointing). The first step (compilation, warm-up) is excluded; the median of the
rest is kept, with the fraction of the machine's measured matmul peak that the update reaches.

Each side runs in a fresh process of its own, and the sides take turns for `--rounds` rounds
(`experiments.benchmarks.rounds`); the table gives medians over rounds, and the median of the ratio
to the TRL run of the same round, with ranges.

Run: python -m experiments.benchmarks.grpo_step [--steps 3] [--rounds 3]
     (needs `pip install -e ".[bench]"`)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from align_jax import losses, rewards
from align_jax.config import RLConfig, TrainConfig
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate
from align_jax.train import online
from align_jax.train.mesh import make_mesh, shard_batch
from align_jax.train.models import Frozen, Models
from align_jax.train.state import init_train_state, make_optimizer
from align_jax.train.step import jit_train_step, make_train_step
from experiments.benchmarks.rounds import alternate, measure, same_round_ratios, spread
from experiments.benchmarks.smollm2 import (
    matmul_peak_gflops,
    smollm2_hf,
    smollm2_parameter_count,
    smollm2_tokenizer,
    trl_seconds_per_step,
)

PROMPTS, G, PROMPT, NEW = 4, 8, 64, 64


def length_reward(completions, **_):
    """A rule reward that needs the decoded text, as answer checks do."""
    return [len(c) / 100.0 for c in completions]


def prompt_texts(tokenizer, rng):
    """Texts that tokenize to exactly PROMPT tokens each (single-token words)."""
    words = [w[1:] for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()]
    words = [w for w in sorted(words)[:4000]
             if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    texts = ["".join(" " + w for w in rng.choice(words, size=PROMPT)) for _ in range(PROMPTS)]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == PROMPT for t in texts)
    return texts


def ours(hf, tokenizer, texts, steps: int) -> dict[str, float]:
    mesh = make_mesh()
    loaded = load_pretrained(hf)
    cfg = RLConfig(num_generations=G, max_new_tokens=NEW, beta=0.0)
    tcfg = TrainConfig(lr=1e-6, steps=steps + 1, max_grad_norm=1.0)
    tx = make_optimizer(tcfg)
    graphdef, state, shardings = init_train_state(lambda r: type(loaded)(loaded.config, rngs=r), tx,
                                                  mesh, 0, nnx.split(loaded)[1])
    step = jit_train_step(make_train_step(online.grpo, Models(graphdef), tx, cfg, 1,
                                          optax.constant_schedule(tcfg.lr)),
                          shardings, Frozen(), mesh)
    prompt_ids = np.asarray([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                            np.int32)
    sampling = SamplingConfig(max_new_tokens=NEW, num_samples=G,
                              pad_token_id=tokenizer.pad_token_id or 0)
    phases = {"generation": [], "scoring": [], "update": []}
    for i in range(steps + 1):
        clock = time.perf_counter()
        done = jax.device_get(generate(nnx.merge(graphdef, state.params), prompt_ids,
                                       np.ones_like(prompt_ids, bool), jax.random.key(i), sampling))
        phases["generation"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        completions = tokenizer.batch_decode(
            [ids[m] for ids, m in zip(done.ids_BxC, done.mask_BxC)])
        r, _ = rewards.score({"length": length_reward}, [1.0],
                             prompts=[t for t in texts for _ in range(G)], completions=completions,
                             completion_ids=[[]] * len(completions), columns={})
        advantages, _ = losses.group_advantages(jnp.asarray(r), G)
        phases["scoring"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        rollout = online.Rollout(np.repeat(prompt_ids, G, 0), np.ones((PROMPTS * G, PROMPT), bool),
                                 done.ids_BxC, done.mask_BxC, done.mask_BxC, done.logps_BxC,
                                 np.asarray(advantages))
        state, metrics = step(state, Frozen(), shard_batch(rollout, mesh))
        jax.block_until_ready(metrics)
        phases["update"].append(time.perf_counter() - clock)
    return {k: float(np.median(v[1:])) for k, v in phases.items()}


def trl(hf, tokenizer, texts, steps: int) -> float:
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * G,
                          num_generations=G, max_completion_length=NEW, max_steps=steps + 1,
                          learning_rate=1e-6, beta=0.0,
                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                          dataloader_num_workers=0, bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=hf, reward_funcs=length_reward, args=args,
                              processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_list(
                                  [{"prompt": t} for t in texts] * (steps + 1)))
        return trl_seconds_per_step(trainer)


def run_side(side: str, steps: int):
    """One side's per-step seconds (ours: by phase), in this (fresh) process."""
    torch.manual_seed(0)
    hf = smollm2_hf().train()
    tokenizer = smollm2_tokenizer()
    texts = prompt_texts(tokenizer, np.random.default_rng(0))
    return ours(hf, tokenizer, texts, steps) if side == "ours" else trl(hf, tokenizer, texts, steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    # one measurement, as JSON
    parser.add_argument("--side", choices=["ours", "trl", "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(matmul_peak_gflops() if args.side == "peak"
                         else run_side(args.side, args.steps)))
        return

    module = "experiments.benchmarks.grpo_step"
    peak = measure(module, "peak")
    results = alternate(module, ["ours", "trl"], args.rounds, "--steps", str(args.steps))
    phases = {k: [r[k] for r in results["ours"]] for k in ("generation", "scoring", "update")}
    seconds = {"ours": [sum(r.values()) for r in results["ours"]], "trl": results["trl"]}
    ratios = same_round_ratios(seconds, "trl")["ours"]
    params = smollm2_parameter_count()
    update_flops = 6 * params * PROMPTS * G * (PROMPT + NEW)
    update, generation = np.median(phases["update"]), np.median(phases["generation"])
    print(f"\nSmolLM2-135M architecture, {params / 1e6:.0f}M params, {PROMPTS} prompts × "
          f"{G} samples × {NEW} new tokens; {torch.get_num_threads()} threads; measured fp32 "
          f"matmul peak {peak:.0f} GFLOP/s; "
          f"{args.rounds} rounds of {args.steps} steps, each side in its own process")
    print("\n| | generation s | scoring s | update s | s / step (range) "
          "| vs TRL, same round (range) |")
    print("|---|---|---|---|---|---|")
    print(f"| align_jax | {generation:.2f} | {np.median(phases['scoring']):.3f} | {update:.2f} | "
          f"{spread(seconds['ours'])} | {spread(ratios, '×')} |")
    print(f"| TRL GRPOTrainer {__import__('trl').__version__} | | | | "
          f"{spread(seconds['trl'])} | 1.00× |")
    print(f"\nupdate at {100 * update_flops / update / 1e9 / peak:.0f}% of the matmul peak; "
          f"generation {PROMPTS * G * NEW / generation:.0f} new tokens/s")


if __name__ == "__main__":
    main()
