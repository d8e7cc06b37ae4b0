"""The DAPO ladder (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale", Table 1) at CPU scale, on the synthetic arithmetic task.

From one SFT model, GRPO and then DAPO's four changes added one at a time, each rung a config
override of `configs/grpo_arithmetic.yaml`. Clipping only binds off-policy, and DAPO's updates are
off-policy (16 mini-batch steps per rollout), so every rung makes μ = 2 passes of 4 mini-batches
over each rollout (8 updates; the demo's recipe makes 1 pass of 2):
  1. GRPO: symmetric clipping ε = 0.2, loss averaged per sequence, then over sequences;
  2. + clip-higher: ε_high = 0.28, so that unlikely tokens with positive advantage can grow;
  3. + token-level loss: every token of the batch weighs the same (`rl.aggregation=token_mean`);
  4. + overlong shaping: truncated completions leave the loss and a soft length penalty in the
     last 8 tokens before `max_new_tokens` joins the reward;
  5. + dynamic sampling: groups whose G rewards are all equal (zero advantage) are dropped and more
     prompts are drawn until the batch is full.
Each rung trains `--rollouts` rollouts for each of `--seeds` seeds, then answers 256 fresh problems
(greedy and 4 samples at T = 1). Reported per rung: accuracy, the policy's mean per-token entropy
over training (and over the last quarter), the fraction of tokens clipped below 1 − ε_low and above
1 + ε_high, and the fraction of zero-advantage groups in updates.

Checks (printed and written with the results):
  - clip-higher keeps the training entropy at or above symmetric clipping's (rung 2 vs rung 1,
    seed-paired, within two standard errors of the paired difference);
  - with dynamic sampling, every update whose batch was filled has no zero-advantage group.

Run: python -m experiments.dapo_ladder [--rollouts 24] [--seeds 2] [--sft-steps 300]
     [--out experiments/results] [--smoke]
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

from align_jax import rewards
from align_jax.config import load_config
from align_jax.data import synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate_text
from align_jax.train import train
from experiments import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNGS = {  # cumulative overrides
    "GRPO": [],
    "+ clip-higher": ["rl.epsilon_high=0.28"],
    "+ token-level loss": ["rl.aggregation=token_mean"],
    "+ overlong shaping": ["rl.mask_truncated=true", "rl.soft_overlong_cache=8"],
    "+ dynamic sampling": ["rl.dynamic_sampling=true"],
}
OFF_POLICY = ["rl.num_iterations=2", "rl.mini_batches=4"]  # every rung
TASK = {"digits": 1, "operators": "+-*"}


def rung_overrides(rung: str) -> list[str]:
    names = list(RUNGS)
    return sum((RUNGS[n] for n in names[:names.index(rung) + 1]), [])


def accuracy(model, problems, *, greedy: bool) -> float:
    tokenizer = tiny_tokenizer()
    n = 1 if greedy else 4
    texts = generate_text(model, tokenizer, problems["prompt"], jax.random.key(0),
                          SamplingConfig(max_new_tokens=32, num_samples=n, greedy=greedy))
    return float(np.mean(rewards.accuracy(texts,
                                          [a for a in problems["answer"] for _ in range(n)])))


def run_ladder(out: Path, *, rollouts: int, seeds: int, sft_steps: int, problems: int = 256,
               extra: tuple[str, ...] = (), smoke: bool = False) -> dict:
    """Train the SFT model, then every rung with its seeds as the members of one sweep; return
    {rung: [per-seed result]} (each seed's seconds: its share of the rung's)."""
    shutil.rmtree(out, ignore_errors=True)
    sft_model = report.sft("sft_arithmetic.yaml", out / "sft", sft_steps, smoke=smoke)
    problems = synthetic.arithmetic(problems, seed=12345, **TASK)
    results = {}
    for rung in RUNGS:
        run = out / f"{list(RUNGS).index(rung) + 1}"
        start = time.perf_counter()
        train(load_config(report.ROOT / "configs/grpo_arithmetic.yaml", [
            f"model.path={sft_model}", f"train.steps={rollouts}", *report.seed_sweep(seeds),
            "train.log_every=1", f"out_dir={run}", *OFF_POLICY, *rung_overrides(rung), *extra]),
            progress=False)
        seconds = (time.perf_counter() - start) / seeds
        results[rung] = []
        for seed in range(seeds):
            member = run / f"seed={seed}"
            rows = report.metrics(member, "train")
            model = load_pretrained(member / "model")
            results[rung].append({
                "entropy": [r["entropy"] for r in rows],
                "frac_reward_zero_std": [r["frac_reward_zero_std"] for r in rows],
                "clipped (low, high)": [(r["clip_ratio/low_mean"], r["clip_ratio/high_mean"])
                                        for r in rows],
                "filled": [r.get("sampling/shortfall_groups", 0) == 0 for r in rows],
                "accuracy (greedy)": accuracy(model, problems, greedy=True),
                "accuracy (T=1)": accuracy(model, problems, greedy=False),
                "seconds": seconds,
            })
            print(f"{rung:20s} seed {seed}: {results[rung][-1]['accuracy (T=1)']:.3f} at T=1",
                  flush=True)
    sft = load_pretrained(sft_model)
    results["SFT"] = [{"accuracy (greedy)": accuracy(sft, problems, greedy=True),
                       "accuracy (T=1)": accuracy(sft, problems, greedy=False)}]
    return results


def check(results: dict) -> list[str]:
    """The two claims; an empty list when both hold."""
    failures = []
    grpo, higher = (np.array([np.mean(r["entropy"]) for r in results[k]])
                    for k in ("GRPO", "+ clip-higher"))
    diff = higher - grpo
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    if diff.mean() < -2 * se:
        failures.append(f"clip-higher's mean training entropy {higher.mean():.4f} is below "
                        f"symmetric clipping's {grpo.mean():.4f} by more than 2 standard errors "
                        f"({se:.4f})")
    for i, r in enumerate(results["+ dynamic sampling"]):
        bad = [step + 1
               for step, (z, filled) in enumerate(zip(r["frac_reward_zero_std"], r["filled"]))
               if filled and z > 0]
        if bad:
            failures.append(f"dynamic sampling, seed {i}: zero-advantage groups in filled updates "
                            f"at rollouts {bad}")
    return failures


def results_table(results: dict) -> str:
    header = ("rung", "accuracy (greedy)", "accuracy (T=1)", "entropy (all rollouts)",
              "entropy (last quarter)", "clipped tokens, low / high (%)", "zero-advantage groups",
              "s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sft = results["SFT"][0]
    lines.append(f"| SFT | {sft['accuracy (greedy)']:.3f} | {sft['accuracy (T=1)']:.3f} "
                 "| | | | | |")
    for rung in RUNGS:
        rs = results[rung]
        quarter = max(1, len(rs[0]["entropy"]) // 4)
        lines.append("| " + " | ".join([
            rung, report.mean_se([r["accuracy (greedy)"] for r in rs]),
            report.mean_se([r["accuracy (T=1)"] for r in rs]),
            report.mean_se([np.mean(r["entropy"]) for r in rs]),
            report.mean_se([np.mean(r["entropy"][-quarter:]) for r in rs]),
            " / ".join(
                f"{100 * np.mean([r['clipped (low, high)'] for r in rs], axis=(0, 1))[i]:.2f}"
                for i in (0, 1)),
            report.mean_se([np.mean(r["frac_reward_zero_std"]) for r in rs]),
            f"{np.mean([r['seconds'] for r in rs]):.0f}"]) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    fig, (ax_entropy, ax_zero) = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, rung in enumerate(RUNGS):
        entropy = np.mean([r["entropy"] for r in results[rung]], axis=0)
        zero = np.mean([r["frac_reward_zero_std"] for r in results[rung]], axis=0)
        steps = np.arange(1, len(entropy) + 1)
        ax_entropy.plot(steps, entropy, color=f"C{i}", label=rung)
        ax_zero.plot(steps, zero, color=f"C{i}", label=rung)
    ax_entropy.set(title="policy entropy per token (mean over seeds)", xlabel="rollout")
    ax_zero.set(title="fraction of zero-advantage groups in the update", xlabel="rollout")
    ax_entropy.legend(fontsize=8)
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(
        __doc__, "dapo_ladder", seeds=2, sft_steps=300,
        smoke="2 rollouts of 4 prompts × 4 samples, 1 seed, 16 test problems")
    parser.add_argument("--rollouts", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    extra = ("train.batch_size=4", "rl.num_generations=4") if args.smoke else ()
    rollouts, seeds, sft_steps, problems = ((2, 1, 30, 16) if args.smoke
                                            else (args.rollouts, args.seeds, args.sft_steps, 256))
    start = time.perf_counter()
    results = run_ladder(args.runs, rollouts=rollouts, seeds=seeds, sft_steps=sft_steps,
                         problems=problems, smoke=args.smoke, extra=extra)
    setup = (f"{sft_steps} SFT steps; {rollouts} rollouts of {4 if args.smoke else 32} prompts × "
             f"{4 if args.smoke else 8} samples per run; {seeds} seeds; "
             "mean ± standard error over seeds.")
    status = report.write(
        args.out, "dapo_ladder",
        title="The DAPO ladder (Yu et al. 2025, Table 1) on synthetic arithmetic",
        body=f"{__doc__.split(chr(10) + chr(10))[1]}\n\n{setup}", table=results_table(results),
        failures=check(results), claim="clip-higher keeps entropy at or above symmetric clipping, "
        "and dynamic sampling leaves no zero-advantage group in a filled update.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "dapo_ladder.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
