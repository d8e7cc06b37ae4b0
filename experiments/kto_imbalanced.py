"""KTO with imbalanced data (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", §4.3 and Fig. 5) at CPU scale, on the synthetic sentiment grammar.

A tiny model is fine-tuned on random review continuations (`configs/sft_sentiment.yaml`). One set
of preferences, pairs of continuations whose better one by the true sentiment is chosen
(`synthetic.sentiment_pairs(beta=None)`), then trains from that model
(`configs/kto_sentiment_sft.yaml`):
  - DPO on the pairs, β = 0.1;
  - KTO on the same pairs unpaired (`data.unpair`: chosen desirable, rejected undesirable), β = 0.1,
    λ_D = λ_U = 1;
  - KTO after dropping 90% of the desirable examples, with λ_D = 1, and with the paper's rescaling
    λ_D n_D / (λ_U n_U) = 1 (`losses.kto_desirable_weight`, here λ_D ≈ 10): the two trained as one
    vmapped program (`sweep.field=desirable_weight`), until they have drawn as many desirable rows
    as balanced KTO does (5.5× its rows): one row in eleven carries the desirable signal, and the
    mechanism (`experiments/kto_bandit.py`) recovers it only that slowly. They draw batches 4×
    larger (a quarter of the steps), so that a batch holds about six desirable rows rather than
    one or two: at 16 rows, one batch in five holds none and pushes every shared word down.
Each model continues 256 held-out review openings, 4 samples each at T = 1; the true-reward gain is
the mean sentiment of those continuations minus the SFT model's, and each KTO run reports the
fraction of DPO's gain it recovers, ± its standard error over seeds (the delta method).

Checks (printed and written with the results):
  - KTO on the same preferences recovers at least 80% of DPO's gain;
  - with 90% of the desirable examples dropped, the rescaled λ_D recovers more of DPO's gain than
    λ_D = 1, and at least 80% of it.

Run: python -m experiments.kto_imbalanced [--seeds 8] [--out experiments/results] [--smoke]
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

from align_jax.config import load_config
from align_jax.data import synthetic, unpair
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.losses import kto_desirable_weight
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate_from_text
from align_jax.train import train
from experiments import kto_bandit, report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KEEP_DESIRABLE = 0.1
IMBALANCED_BATCH = 4  # × the balanced runs' batch
RECOVERED = 0.8
RUNS = ("DPO", "KTO", "KTO, 10% desirable, λ_D = 1", "KTO, 10% desirable, λ_D rescaled")
MECHANISM = (
    "**The mechanism, on a log-linear policy** (`experiments/kto_bandit.py`): the library's "
    "`kto_loss` and `dpo_loss` (β = 0.1) train π(y) ∝ exp(b_y + w·s_y) over 32 responses the "
    "data contains (rewards standard normal, a shared feature s = 1) and 32 it never does "
    "(reward 0, s = 0), from a uniform reference, on 16 fresh pairs a step with Adam at 1e-2. "
    "Gain in the exact E_π[r], mean ± SE over 16 seeds trained as lanes of one vmapped program:")


def datasets_for(pairs, out: Path, seed: int, steps: int, batch: int
                 ) -> dict[str, tuple[Path, list[str], dict[str, str]]]:
    """Write the three training sets; {job: (file, extra overrides, {run: its directory in the
    job's})}. The two λ_D runs on the imbalanced set are the members of one sweep job, which
    draws batches of `IMBALANCED_BATCH` × `batch` rows until it has drawn as many desirable rows
    as balanced KTO does in `steps` steps of `batch`."""
    out.mkdir(parents=True, exist_ok=True)
    unpaired = unpair(pairs)
    desirable = [i for i, label in enumerate(unpaired["label"]) if label]
    rng = np.random.default_rng(seed)
    dropped = set(rng.choice(desirable, size=len(desirable) - int(KEEP_DESIRABLE * len(desirable)),
                             replace=False))
    imbalanced = unpaired.select([i for i in range(len(unpaired)) if i not in dropped])
    n_d = int(np.sum(imbalanced["label"]))
    weight = kto_desirable_weight(n_d, len(imbalanced) - n_d)
    files = {name: out / f"{name}.jsonl" for name in ("pairs", "unpaired", "imbalanced")}
    for name, ds in zip(files, (pairs, unpaired, imbalanced)):
        ds.to_json(str(files[name]), lines=True)
    # desirable rows drawn per row: a half of the balanced set's, n_d / n of the imbalanced one's
    imbalanced_steps = round(steps * 0.5 * len(imbalanced) / n_d / IMBALANCED_BATCH)
    sweep = ["sweep.field=desirable_weight", f"sweep.values=[1.0,{weight}]",
             f"train.steps={imbalanced_steps}", f"train.batch_size={IMBALANCED_BATCH * batch}"]
    return {"DPO": (files["pairs"], ["train.method=dpo", "loss.loss_type=sigmoid"], {"DPO": ""}),
            "KTO": (files["unpaired"], [], {"KTO": ""}),
            "λ_D sweep": (files["imbalanced"], sweep, {RUNS[2]: "desirable_weight=1",
                                                      RUNS[3]: f"desirable_weight={weight:g}"})}


def true_reward(model_dir: Path, prompts: list[str]) -> float:
    """Mean true sentiment of 4 continuations per prompt at T = 1."""
    texts = generate_from_text(load_pretrained(model_dir), tiny_tokenizer(), prompts,
                               jax.random.key(0),
                               SamplingConfig(max_new_tokens=48, num_samples=4))[0]
    return float(np.mean(synthetic.sentiment_reward(texts)))


def run_study(out: Path, *, seeds: int, sft_steps: int, steps: int, pairs: int, prompts: int = 256,
              extra: tuple[str, ...] = (), smoke: bool = False) -> dict:
    """SFT, then every run for every seed; {run: [per-seed {reward, seconds}]} plus "SFT"."""
    shutil.rmtree(out, ignore_errors=True)
    sft_model = report.sft("sft_sentiment.yaml", out / "sft", sft_steps, smoke=smoke)
    held_out = list(synthetic.sentiment(prompts, seed=12345)["prompt"])
    results = {"SFT": [{"reward": true_reward(sft_model, held_out)}]}
    config = report.ROOT / "configs/kto_sentiment_sft.yaml"
    batch = load_config(config, list(extra)).train.batch_size
    for seed in range(seeds):
        data = datasets_for(synthetic.sentiment_pairs(pairs, seed=seed + 1, beta=None),
                            out / f"data_seed{seed}", seed, steps, batch)
        for i, (path, overrides, runs) in enumerate(data.values()):
            start, job_dir = time.perf_counter(), out / f"{i}_seed{seed}"
            train(load_config(config, [
                f"model.path={sft_model}", f"data.train={path}", f"train.steps={steps}",
                f"train.seed={seed}", f"out_dir={job_dir}", *extra, *overrides]), progress=False)
            # a sweep's time, shared by its members
            seconds = (time.perf_counter() - start) / len(runs)
            for name, member in runs.items():
                reward = true_reward(job_dir / member / "model", held_out)
                results.setdefault(name, []).append({"reward": reward, "seconds": seconds})
                print(f"{name:34s} seed {seed}: true reward {reward:+.3f}", flush=True)
    return results


def gains(results: dict) -> dict[str, np.ndarray]:
    """Per-seed true-reward gain over the SFT model, for each run."""
    base = results["SFT"][0]["reward"]
    return {name: np.array([r["reward"] - base for r in results[name]]) for name in RUNS}


def recovered(results: dict) -> dict[str, float]:
    """Each run's mean gain as a fraction of DPO's mean gain."""
    g = gains(results)
    return {name: float(g[name].mean() / g["DPO"].mean()) for name in RUNS}


def recovered_se(results: dict) -> dict[str, float]:
    """The standard error over seeds of each run's fraction f = mean(g) / mean(g_DPO): the ratio
    estimator's, the standard error of the mean of (g_s − f g_DPO,s) / mean(g_DPO) (the delta
    method; a seed's runs share its pairs, so their gains covary). 0 for one seed."""
    g, fraction = gains(results), recovered(results)
    return {name: report.mean_and_se((g[name] - fraction[name] * g["DPO"]) / g["DPO"].mean())[1]
            for name in RUNS}


def check(results: dict) -> list[str]:
    """The paper's claims at this scale; an empty list when they hold."""
    dpo_gain = gains(results)["DPO"].mean()
    if dpo_gain <= 0:
        return [f"DPO does not raise the true reward (gain {dpo_gain:+.3f}), "
                "so there is no gain to recover"]
    failures, fraction, se = [], recovered(results), recovered_se(results)
    if fraction["KTO"] < RECOVERED:
        failures.append(f"KTO recovers {fraction['KTO']:.2f} ± {se['KTO']:.2f} of DPO's gain, "
                        f"less than {RECOVERED}")
    if fraction[RUNS[3]] <= fraction[RUNS[2]]:
        failures.append(f"with 10% of the desirable examples, the rescaled λ_D recovers "
                        f"{fraction[RUNS[3]]:.2f} of DPO's gain, not more than λ_D = 1 "
                        f"({fraction[RUNS[2]]:.2f})")
    if fraction[RUNS[3]] < RECOVERED:
        failures.append(f"with 10% of the desirable examples, the rescaled λ_D recovers "
                        f"{fraction[RUNS[3]]:.2f} of DPO's gain, less than {RECOVERED}")
    return failures


def results_table(results: dict) -> str:
    g, fraction, se = gains(results), recovered(results), recovered_se(results)
    lines = ["| model | true reward | gain over SFT | fraction of DPO's gain "
             "| s / run (a sweep: its time / 2) |",
             "|---|---|---|---|---|",
             f"| SFT | {results['SFT'][0]['reward']:.3f} | | | |"]
    for name in RUNS:
        lines.append(f"| {name} | {report.mean_se([r['reward'] for r in results[name]])} | "
                     f"{report.mean_se(g[name])} | {fraction[name]:.2f} ± {se[name]:.2f} | "
                     f"{np.mean([r['seconds'] for r in results[name]]):.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    g = gains(results)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(range(len(RUNS)), [g[n].mean() for n in RUNS], color=["C2", "C0", "C7", "C1"],
           yerr=[g[n].std(ddof=1) / np.sqrt(len(g[n])) if len(g[n]) > 1 else 0 for n in RUNS])
    ax.set_xticks(range(len(RUNS)), [n.replace(", ", ",\n") for n in RUNS], fontsize=8)
    ax.set(title="true-reward gain over the SFT model", ylabel="Δ mean sentiment")
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(
        __doc__, "kto_imbalanced", seeds=8, sft_steps=300,
        smoke="4 steps of 4 rows, 1 seed, 200 pairs, 16 held-out prompts")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=4000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        seeds, sft_steps, steps, pairs, prompts, extra = 1, 20, 4, 200, 16, ("train.batch_size=4",)
    else:
        seeds, sft_steps, steps, pairs, prompts, extra = (args.seeds, args.sft_steps, args.steps,
                                                          args.pairs, 256, ())
    start = time.perf_counter()
    values = kto_bandit.run(**({"seeds": 2, "steps": 300} if args.smoke else {}))
    results = run_study(args.runs, seeds=seeds, sft_steps=sft_steps, steps=steps, pairs=pairs,
                        prompts=prompts, extra=extra, smoke=args.smoke)
    paragraphs = __doc__.split("\n\n")
    setup = (f"{sft_steps} SFT steps; {pairs} pairs; {steps} steps per run (the λ_D sweep: as "
             f"many desirable rows); {seeds} seeds; "
             "mean ± standard error over seeds.")
    status = report.write(
        args.out, "kto_imbalanced", title="KTO with imbalanced data (Ethayarajh et al. 2024) on "
        "the synthetic sentiment grammar", body="\n\n".join([*paragraphs[1:3], setup]),
        table=f"{results_table(results)}\n\n{MECHANISM}\n\n{kto_bandit.table(values)}\n\n"
              f"{kto_bandit.fraction_of_dpo(values, threshold=RECOVERED)}",
        failures=kto_bandit.check(values) + check(results),
        claim="KTO matches DPO on the same preferences, and with 90% of the desirable "
        "examples dropped the rescaled λ_D recovers most of the gain, more than λ_D = 1.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "kto_imbalanced.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
