"""GRPO's length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
Perspective", §3.1 and Fig. 5) at CPU scale, on the synthetic arithmetic task.

GRPO averages each completion's token losses before averaging over completions, so every token of
a completion of length |o| weighs 1/|o|: a wrong answer (negative advantage) is penalised less per
token the longer it is, and a right one (positive advantage) rewarded more per token the shorter
it is. Under GRPO, wrong answers should therefore grow longer relative to right ones. Dr. GRPO
sums the token losses over a constant length and drops the division by the group's reward std
(`rl.aggregation=token_sum_over_max_len`, `rl.scale_rewards=none`), which removes the bias.

To give length a free direction, the SFT data end each <think> with 0 … `--filler` " ." tokens
(`synthetic.arithmetic(filler=…)`): padding that changes neither the answer nor the format. From
one SFT model, GRPO and Dr. GRPO train `--rollouts` rollouts for each of `--seeds` seeds; the SFT
model and every final model answer 256 fresh problems with 4 samples at T = 1, and the gap
  gap = mean length of wrong answers − mean length of right answers (tokens)
is measured before and after. Check: under GRPO the gap grows by more than two standard errors;
under Dr. GRPO it grows less than under GRPO and by no more than two standard errors.

Run: python -m experiments.dr_grpo_length [--rollouts 40] [--seeds 2] [--filler 12]
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
from align_jax.sampling import SamplingConfig, generate_from_text
from align_jax.train import train
from experiments import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"GRPO": [],
           "Dr. GRPO": ["rl.scale_rewards=none", "rl.aggregation=token_sum_over_max_len"]}
TASK = {"digits": 1, "operators": "+-*"}
MAX_NEW_TOKENS = 48


def lengths_by_correctness(model, problems) -> dict:
    """Lengths (generated tokens, EOS included) of 4 samples per problem at T = 1, split by whether
    the answer is right."""
    texts, out = generate_from_text(model, tiny_tokenizer(), problems["prompt"], jax.random.key(0),
                                    SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, num_samples=4))
    right = np.array(rewards.accuracy(texts,
                                      [a for a in problems["answer"] for _ in range(4)])) == 1.0
    lengths = np.asarray(out.lengths_B, float)
    return {"right": lengths[right], "wrong": lengths[~right], "accuracy": float(right.mean())}


def gap(sample: dict) -> tuple[float, float]:
    """mean(wrong) − mean(right) and its standard error."""
    w, r = sample["wrong"], sample["right"]
    if len(w) < 2 or len(r) < 2:
        return float("nan"), float("nan")
    return float(w.mean() - r.mean()), float(np.sqrt(w.var(ddof=1) / len(w)
                                                     + r.var(ddof=1) / len(r)))


def run_study(out: Path, *, rollouts: int, seeds: int, sft_steps: int, filler: int,
              problems: int = 256, extra: tuple[str, ...] = (), smoke: bool = False) -> dict:
    """{"SFT": sample, method: [sample per seed]}, each method's seeds the members of one sweep,
    with each seed's share of its training time under "seconds"."""
    shutil.rmtree(out, ignore_errors=True)
    sft_model = report.sft("sft_arithmetic.yaml", out / "sft", sft_steps,
                           f"data.synthetic_args.filler={filler}", smoke=smoke)
    test = synthetic.arithmetic(problems, seed=12345, **TASK)
    results = {"SFT": lengths_by_correctness(load_pretrained(sft_model), test)}
    for method, overrides in METHODS.items():
        run = out / method.replace(". ", "_").lower()
        start = time.perf_counter()
        train(load_config(report.ROOT / "configs/grpo_arithmetic.yaml", [
            f"model.path={sft_model}", f"train.steps={rollouts}", *report.seed_sweep(seeds),
            f"rl.max_new_tokens={MAX_NEW_TOKENS}", f"out_dir={run}", *overrides, *extra]),
            progress=False)
        seconds = (time.perf_counter() - start) / seeds
        results[method] = []
        for seed in range(seeds):
            sample = lengths_by_correctness(load_pretrained(run / f"seed={seed}" / "model"), test)
            sample["seconds"] = seconds
            results[method].append(sample)
            print(f"{method:9s} seed {seed}: gap {gap(sample)[0]:+.2f} tokens "
                  f"(SFT {gap(results['SFT'])[0]:+.2f}), accuracy {sample['accuracy']:.3f}",
                  flush=True)
    return results


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def pooled(samples: list[dict]) -> dict:
    return {k: np.concatenate([s[k] for s in samples]) for k in ("right", "wrong")}


def check(results: dict) -> list[str]:
    """The paper's claim at this scale; an empty list when it holds."""
    base, _ = gap(results["SFT"])
    growth = {m: (gap(pooled(results[m]))[0] - base, gap(pooled(results[m]))[1]) for m in METHODS}
    failures = []
    g, se = growth["GRPO"]
    if not g > 2 * se:
        failures.append(f"under GRPO the gap grew by {g:+.2f} tokens, not more than 2 standard "
                        f"errors ({se:.2f})")
    d, se_d = growth["Dr. GRPO"]
    if not d < g:
        failures.append(f"the gap grew more under Dr. GRPO ({d:+.2f}) than under GRPO ({g:+.2f})")
    if d > 2 * se_d:
        failures.append(f"under Dr. GRPO the gap grew by {d:+.2f} tokens, more than 2 standard "
                        f"errors ({se_d:.2f})")
    return failures


def results_table(results: dict) -> str:
    header = ("model", "accuracy (T=1)", "length, right", "length, wrong", "gap (wrong − right)",
              "s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("SFT", [results["SFT"]])] + [(m, results[m]) for m in METHODS]
    for name, samples in rows:
        both = pooled(samples)
        g, se = gap(both)
        seconds = (f"{np.mean([s['seconds'] for s in samples]):.0f}" if "seconds" in samples[0]
                   else "")
        lines.append(f"| {name} | {np.mean([s['accuracy'] for s in samples]):.3f} | "
                     f"{_mean(both['right']):.2f} | {_mean(both['wrong']):.2f} | "
                     f"{g:+.2f} ± {se:.2f} | {seconds} |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = ["SFT", *METHODS]
    for j, (kind, color) in enumerate((("right", "C2"), ("wrong", "C3"))):
        means = [_mean(pooled([results[n]] if n == "SFT" else results[n])[kind]) for n in names]
        ax.bar(np.arange(len(names)) + 0.38 * (j - 0.5), means, 0.38, color=color,
               label=f"{kind} answers")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="mean length (tokens)", title="completion length by correctness, T = 1")
    ax.legend()
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(
        __doc__, "dr_grpo_length", seeds=2, sft_steps=300,
        smoke="2 rollouts of 4 prompts × 4 samples, 1 seed, 16 test problems")
    parser.add_argument("--rollouts", type=int, default=40)
    parser.add_argument("--filler", type=int, default=12)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    extra = ("train.batch_size=4", "rl.num_generations=4") if args.smoke else ()
    rollouts, seeds, sft_steps, problems = ((2, 1, 30, 16) if args.smoke
                                            else (args.rollouts, args.seeds, args.sft_steps, 256))
    start = time.perf_counter()
    results = run_study(args.runs, rollouts=rollouts, seeds=seeds, sft_steps=sft_steps,
                        filler=args.filler, smoke=args.smoke, problems=problems, extra=extra)
    paragraphs = __doc__.split("\n\n")
    setup = (f"{sft_steps} SFT steps with 0–{args.filler} filler tokens; {rollouts} rollouts of "
             f"{4 if args.smoke else 32} prompts × {4 if args.smoke else 8} samples per run; "
             f"{seeds} seeds, pooled; "
             "± is the standard error of the difference of means.")
    status = report.write(
        args.out, "dr_grpo_length",
        title="GRPO's length bias and Dr. GRPO (Liu et al. 2025, §3.1) on synthetic arithmetic",
        body=f"{paragraphs[1]}\n\n{paragraphs[2]}\n\n{setup}", table=results_table(results),
        failures=check(results), claim="under GRPO wrong answers grow longer relative to right "
        "ones; under Dr. GRPO they do not.", seconds=time.perf_counter() - start)
    plot(results, args.out / "dr_grpo_length.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
