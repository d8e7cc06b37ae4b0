"""SimPO's length ablations (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward", Table 5, Fig. 2 and Fig. 3a) at CPU scale, on the synthetic sentiment
grammar.

A tiny model is first fine-tuned on random review continuations (`configs/sft_sentiment.yaml`),
then trained on preference pairs labelled by the true sentiment, whatever their lengths
(`synthetic.sentiment_pairs`): the regime of the mechanism (`experiments/simpo_bandit.py`), where
a summed log-probability reward is violated most by pairs whose chosen answer is the longer one.
Kept only when the chosen continuation is also the longer one (`--longer-chosen`), the pairs
teach every method the length shortcut alike. From the same SFT model
(`configs/simpo_sentiment.yaml`):
  - SimPO, reward β/|y| · log π(y), β = 2, for each target margin γ ∈ {0, 0.5, 1, 2}, the four
    trained as one vmapped program (`sweep.field=simpo_gamma`);
  - SimPO w/o LN (length normalisation), reward β · log π(y), γ = 1;
  - DPO, reward β · log π(y)/π_SFT(y), β = 0.1.
Each run's own implicit reward ranks 1,024 held-out pairs (reward accuracy; and the SFT model's
by the same reward, from the run's step-0 evaluation); then the model
continues 256 held-out review openings, 4 samples each at T = 1, and we measure the mean length
(tokens) and the fraction that hit the 48-token limit, the true sentiment of the continuations,
and the Spearman correlation ρ between a sample's length and its average log-probability
(1/|y|) log π(y) under the policy (Fig. 2b–c).

Checks (printed and written with the results):
  - without length normalisation the generations are the longest of SimPO (γ = 1), SimPO w/o LN
    and DPO, and ρ(length, average log-probability) is the highest of the three;
  - held-out reward accuracy rises with γ: positive least-squares slope over the sweep, and the
    largest γ beats γ = 0 by more than two binomial standard errors.

Run: python -m experiments.simpo_ablations [--seeds 2] [--longer-chosen] [--out experiments/results]
     [--smoke]
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
import scipy.stats

from align_jax.config import load_config
from align_jax.data import synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate_from_text
from align_jax.train import train
from experiments import report, simpo_bandit, simpo_margin

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GAMMAS = (0.0, 0.5, 1.0, 2.0)  # one vmapped program per seed (`sweep.field=simpo_gamma`)
# name: the sweep member's name
SWEPT = {f"SimPO (γ = {g:g})": f"simpo_gamma={g:g}" for g in GAMMAS}
DPO, NO_LN = "DPO (β = 0.1)", "SimPO w/o LN (γ = 1)"
RUNS = {  # name: overrides of configs/simpo_sentiment.yaml (SimPO, β = 2, γ = 1)
    NO_LN: ["loss.simpo_length_normalize=false"],
    DPO: ["loss.loss_type=sigmoid", "loss.beta=0.1"],
}
MAIN = ("SimPO (γ = 1)", NO_LN, DPO)  # the three of the length check
EVAL_PAIRS = 1024  # train.eval_batches × train.batch_size in configs/simpo_sentiment.yaml
MAX_NEW_TOKENS = 48
MECHANISM = (
    "**The mechanism, on a tabular policy** (`experiments/simpo_bandit.py`): the library's "
    "`simpo_loss` and `dpo_loss` (β as above, γ = 1) train a table of content, word and stopping "
    "probabilities on pairs that prefer the good content to the bad, with both responses' "
    "lengths (0–24 words of 16) drawn uniformly and independently; Adam at 1e-2 on 16 fresh "
    "pairs a step. Exact expected length E[k] in words, mean ± SE over 16 seeds trained as lanes "
    "of one vmapped program:")
MARGIN = (
    "**The margin's mechanism, on a tabular policy** (`experiments/simpo_margin.py`): the "
    "library's `simpo_loss` (β = 2, γ as above) trains a softmax over 64 one-token responses, "
    "their true rewards N(0, 1), on 512 pairs labelled by Bradley-Terry on those rewards; Adam at "
    "1e-2 on batches of 32. The implicit reward's ranking accuracy over all 2,016 pairs of "
    "responses, and the chosen responses' mean log π, mean ± SE over 16 seeds:")
MARGIN_HOLDS = (
    "γ spreads the implicit rewards without reordering them (at the optimum a pair's reward gap "
    "has the sign of its preference for every γ), so on the tabular policy the ranking accuracy "
    "is flat in γ while the chosen responses lose likelihood: a flat held-out accuracy is what "
    "the loss itself predicts, and a rise with γ would have to come from how a large network "
    "generalises, which this scale does not show.")


def generations(model, prompts: list[str]) -> dict:
    """4 samples per prompt at T = 1: lengths, true rewards, and ρ(length, mean log-prob)."""
    texts, out = generate_from_text(model, tiny_tokenizer(), prompts, jax.random.key(0),
                                    SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, num_samples=4))
    lengths = np.asarray(out.lengths_B, float)
    mean_logp = np.asarray(out.logps_BxC.sum(axis=1)) / np.maximum(lengths, 1)
    return {"length": float(lengths.mean()), "truncated": float(np.mean(out.truncated_B)),
            "reward": float(np.mean(synthetic.sentiment_reward(texts))),
            "rho": float(scipy.stats.spearmanr(lengths, mean_logp).statistic)}


def start_accuracy(run_dir: Path) -> float:
    """The held-out reward accuracy of the starting (SFT) model under the run's own reward: the
    run's step-0 evaluation (`train.eval_on_start`)."""
    return next(r["rewards/accuracies"] for r in report.metrics(run_dir, "eval") if r["step"] == 0)


def run_study(out: Path, *, seeds: int, sft_steps: int, steps: int, prompts: int = 256,
              extra: tuple[str, ...] = (), smoke: bool = False) -> dict:
    """Train the SFT model, then every run for every seed; return {name: [per-seed result]}."""
    shutil.rmtree(out, ignore_errors=True)
    sft_model = report.sft("sft_sentiment.yaml", out / "sft", sft_steps, smoke=smoke)
    held_out = list(synthetic.sentiment(prompts, seed=12345)["prompt"])
    results = {"SFT": [generations(load_pretrained(sft_model), held_out)],
               **{name: [] for name in [*SWEPT, *RUNS]}}

    def run(seed: int, run_dir: Path, *overrides: str) -> dict:
        return train(load_config(report.ROOT / "configs/simpo_sentiment.yaml", [
            f"model.path={sft_model}", f"train.steps={steps}", f"train.eval_every={steps}",
            "train.eval_on_start=true", f"train.seed={seed}", f"out_dir={run_dir}", *overrides,
            *extra]), progress=False)

    def record(name: str, seed: int, model_dir: Path, last: dict, seconds: float):
        result = generations(load_pretrained(model_dir), held_out)
        result.update({"reward accuracy": last["eval_rewards/accuracies"], "seconds": seconds})
        if name != DPO:  # DPO's implicit reward log π/π_SFT is 0 for the SFT model
            result["SFT reward accuracy"] = start_accuracy(model_dir.parent)
        results[name].append(result)
        print(f"{name:22s} seed {seed}: reward accuracy {result['reward accuracy']:.3f}, "
              f"length {result['length']:.1f}, ρ {result['rho']:+.2f}", flush=True)

    for seed in range(seeds):
        start, sweep_dir = time.perf_counter(), out / f"gamma_sweep_seed{seed}"
        members = run(seed, sweep_dir, "sweep.field=simpo_gamma",
                      f"sweep.values=[{','.join(map(str, GAMMAS))}]")
        seconds = (time.perf_counter() - start) / len(GAMMAS)
        for name, member in SWEPT.items():
            record(name, seed, sweep_dir / member / "model", members[member], seconds)
        for i, (name, overrides) in enumerate(RUNS.items()):
            start = time.perf_counter()
            last = run(seed, out / f"{i}_seed{seed}", *overrides)
            record(name, seed, out / f"{i}_seed{seed}" / "model", last, time.perf_counter() - start)
    return results


def _mean(results: dict, name: str, key: str) -> float:
    return float(np.mean([r[key] for r in results[name]]))


def check(results: dict, eval_pairs: int = EVAL_PAIRS) -> list[str]:
    """The paper's claims at this scale; an empty list when they hold."""
    failures = []
    for key, what in (("length", "mean generation length"),
                      ("rho", "ρ(length, average log-probability)")):
        values = {name: _mean(results, name, key) for name in MAIN}
        if max(values, key=values.get) != NO_LN:
            failures.append(f"{what} is not highest without length normalisation: "
                            + ", ".join(f"{n} {v:.3f}" for n, v in values.items()))
    sweep = np.array([_mean(results, f"SimPO (γ = {g:g})", "reward accuracy") for g in GAMMAS])
    slope = np.polyfit(GAMMAS, sweep, 1)[0]
    n = eval_pairs * len(results[f"SimPO (γ = {GAMMAS[0]:g})"])
    se = np.sqrt(sweep[0] * (1 - sweep[0]) / n + sweep[-1] * (1 - sweep[-1]) / n)
    if slope <= 0:
        failures.append("held-out reward accuracy does not rise with γ "
                        f"(slope {slope:+.4f} per unit of γ)")
    if sweep[-1] - sweep[0] <= 2 * se:
        failures.append(f"γ = {GAMMAS[-1]:g} beats γ = 0 in held-out reward accuracy by "
                        f"{sweep[-1] - sweep[0]:+.3f}, not more than 2 standard errors "
                        f"(2 × {se:.3f})")
    return failures


def results_table(results: dict) -> str:
    header = ("model", "held-out reward accuracy", "the SFT model's, by the same reward",
              "length (tokens)", "hit the length limit", "true sentiment", "ρ(length, avg log π)",
              "s / run (γ sweep: its time / 4)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rs in results.items():
        cells = [report.mean_se([r[k] for r in rs]) if k in rs[0] else "" for k in
                 ("reward accuracy", "SFT reward accuracy", "length", "truncated", "reward", "rho")]
        seconds = f"{np.mean([r['seconds'] for r in rs]):.0f}" if "seconds" in rs[0] else ""
        lines.append("| " + " | ".join([name, *cells, seconds]) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    fig, (ax_gamma, ax_length) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_gamma.plot(GAMMAS, [_mean(results, f"SimPO (γ = {g:g})", "reward accuracy") for g in GAMMAS],
                  "o-")
    ax_gamma.set(title="SimPO: target margin γ (β = 2)", xlabel="γ",
                 ylabel="held-out reward accuracy")
    names = ["SFT", *MAIN]
    ax_length.bar(range(len(names)), [_mean(results, n, "length") for n in names],
                  color=["C7", "C0", "C3", "C2"])
    ax_length.set_xticks(range(len(names)), names, fontsize=8)
    ax_length.set(title="generation length at T = 1", ylabel="mean tokens")
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(
        __doc__, "simpo_ablations", seeds=2, sft_steps=300,
        smoke="4 steps of 4 pairs, 1 seed, 16 held-out prompts and pairs")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--longer-chosen", action="store_true",
                        help="keep only the pairs whose chosen continuation is the longer one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    extra = ((("train.batch_size=4", "train.eval_batches=4", "data.synthetic_args.n=400")
              if args.smoke else ())
             + (("data.synthetic_args.longer_chosen=true",) if args.longer_chosen else ()))
    seeds, sft_steps, steps, prompts = ((1, 20, 4, 16) if args.smoke
                                        else (args.seeds, args.sft_steps, args.steps, 256))
    start = time.perf_counter()
    lengths = simpo_bandit.run(**({"seeds": 2, "steps": 30} if args.smoke else {}))
    margins = simpo_margin.run(**({"seeds": 2, "steps": 30} if args.smoke else {}))
    margin_failures = simpo_margin.check(margins)
    results = run_study(args.runs, seeds=seeds, sft_steps=sft_steps, steps=steps, prompts=prompts,
                        extra=extra, smoke=args.smoke)
    paragraphs = __doc__.split("\n\n")
    setup = (f"{sft_steps} SFT steps; {steps} preference steps of {4 if args.smoke else 16} pairs "
             f"per run{' (longer chosen only)' if args.longer_chosen else ''}; {seeds} seeds; "
             "mean ± standard error over seeds.")
    status = report.write(
        args.out, "simpo_ablations",
        title="SimPO's length ablations (Meng et al. 2024) on the synthetic sentiment grammar",
        body=f"{paragraphs[1]}\n\n{paragraphs[2]}\n\n{setup}",
        table=f"{results_table(results)}\n\n{MECHANISM}\n\n{simpo_bandit.table(lengths)}\n\n"
              f"{MARGIN}\n\n{simpo_margin.table(margins)}"
              + ("" if margin_failures else f"\n\n{MARGIN_HOLDS}"),
        failures=(simpo_bandit.check(lengths) + margin_failures
                  + check(results, 16 if args.smoke else EVAL_PAIRS)),
        claim="without length normalisation generations are longest and length and "
        "log-likelihood are most correlated; held-out reward accuracy rises with γ.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "simpo_ablations.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
