"""Reward-model over-optimisation (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization", Fig. 1a and §4.2 on reward-model data size) at CPU scale, on the synthetic
sentiment grammar, whose true sentiment `synthetic.sentiment_score` plays the gold reward.

A tiny model is fine-tuned on random review continuations (`configs/sft_sentiment.yaml`). Proxy
reward models start from it, as Gao et al.'s start from the pretrained model, with a new scalar
head (`configs/reward_sentiment.yaml`), and are trained with the plain Bradley-Terry loss, as Gao
et al.'s (no reward-centering term), on N ∈ {256, 1k, 4k, 16k} comparisons labelled by
Bradley-Terry on the gold reward, P(a ≻ b) = σ(r_a − r_b). As Gao et al. train every
proxy to its best held-out loss, each is evaluated on the same 1,024 validation comparisons every
32 updates (every epoch, where an epoch is shorter), stopped once 12 evaluations in a row found no
lower loss, and kept at its lowest (`train.early_stopping_patience`, `train.keep_best`): a small
set is not overfitted by passing over it many times, nor a large one cut short by a budget of
updates. The patience is long because the validation loss moves by 0.02–0.04 from one evaluation
to the next while a learning proxy's falls by 0.01–0.02 per 128 updates: over 4 evaluations a
plateau is as often noise as the end of learning. A proxy whose lowest validation loss is
ln 2 = 0.693 has learnt nothing that carries to new comparisons: Gao et al. (§4.2) find that
reward models need about 2,000 comparisons before they beat chance. Their accuracy is measured
on 2,048 other held-out comparisons, next to the Bayes ceiling E[max(σ(Δ), σ(−Δ))] of those
comparisons: the accuracy of a model that knew the gold reward.

Best-of-n: the SFT policy draws M = 512 continuations at T = 1 for each of 64 held-out openings,
and best-of-n keeps the one a proxy scores highest among n. Its expected gold reward is computed
for every n from the same M samples with Gao et al.'s unbiased estimator (their App. I): ranked
by proxy score, the sample of rank i (ascending) is the pick of a uniformly random n-subset with
probability C(i−1, n−1) / C(M, n). The KL of best-of-n to the policy is log n − (n−1)/n, and the
gold-reward gain is fitted with Gao et al.'s best-of-n form R(d) = d (α − β d) in d = √KL, which
peaks at d* = α / (2β) (never, when β ≤ 0; at once, d* = 0, when α ≤ 0 < β: optimising against
that proxy only loses gold reward). Best-of-n by the gold reward itself is the oracle.

Checks (printed and written with the results):
  - the N = 16k proxy's held-out accuracy is within 0.03 of the Bayes ceiling;
  - the gold reward peaks later for more data: among the N whose proxies are nearer the Bayes
    ceiling than chance in held-out accuracy (at least three N), the fitted d* does not fall as N
    grows, and is larger at the largest N than at the smallest. A proxy near chance ranks the
    samples nearly at random: its best-of-n gold curve is nearly flat, and where it "peaks" is
    noise (Gao et al. find the same below about 2,000 comparisons).

Run: python -m experiments.rm_overoptimization [--seeds 2] [--out experiments/results] [--smoke]
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
import scipy.special
from flax import nnx

from align_jax.config import load_config
from align_jax.data import synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.data.tokenize import render_pair
from align_jax.models import load_pretrained
from align_jax.rewards import reward_model_reward
from align_jax.sampling import SamplingConfig, generate_from_text
from align_jax.train import train
from experiments import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = (256, 1024, 4096, 16384)
CEILING_GAP = 0.03
EVAL_EVERY, PATIENCE = 32, 12  # updates between validation losses; evaluations without a lower one


def bon_weights(num_samples: int, ns) -> np.ndarray:
    """[len(ns), M]: row k is the probability that the sample of ascending rank i (1-based) is the
    best of a uniformly random ns[k]-subset of the M samples, C(i−1, n−1) / C(M, n)."""
    # comb is 0 where i − 1 < n − 1; exact in float64 up to M ≈ 1,000
    ranks = np.arange(1, num_samples + 1)
    return np.stack([scipy.special.comb(ranks - 1, n - 1) / scipy.special.comb(num_samples, n)
                     for n in ns])


def best_of_n_gold(proxy_PxM: np.ndarray, gold_PxM: np.ndarray, ns) -> np.ndarray:
    """Expected gold reward of best-of-n by the proxy, for each n in `ns`, averaged over prompts."""
    order = np.argsort(proxy_PxM, axis=1, kind="stable")
    gold_sorted = np.take_along_axis(gold_PxM, order, axis=1)
    return (gold_sorted @ bon_weights(proxy_PxM.shape[1], ns).T).mean(axis=0)


def bon_kl(ns) -> np.ndarray:
    """KL(best-of-n ‖ policy) = log n − (n − 1)/n (Stiennon et al. 2020; Gao et al. §2)."""
    ns = np.asarray(ns, float)
    return np.log(ns) - (ns - 1) / ns


def fit_peak(ns, gold: np.ndarray) -> tuple[float, float, float]:
    """Least squares of gold(n) − gold(1) = d (α − β d), d = √KL, and where the fitted curve
    peaks over d ≥ 0: (α, β, d* = max(α, 0) / 2β; ∞ if β ≤ 0, as it never turns over)."""
    d = np.sqrt(bon_kl(ns))
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * d], axis=1), gold - gold[0], rcond=None)
    peak = max(alpha, 0.0) / (2 * beta) if beta > 0 else float("inf")
    return float(alpha), float(beta), float(peak)


def bayes_ceiling(score_chosen, score_rejected) -> float:
    """E[max(σ(Δ), σ(−Δ))]: the expected accuracy of ranking each pair by the gold reward when its
    label was drawn from Bradley-Terry with P(chosen ≻ rejected) = σ(Δ)."""
    delta = np.asarray(score_chosen) - np.asarray(score_rejected)
    return float(np.mean(scipy.special.expit(np.abs(delta))))


def proxy_scores(model_dir: Path):
    model = load_pretrained(model_dir)
    graphdef, params = nnx.split(model)
    score = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p).score(ids, mask))
    tokenizer = tiny_tokenizer()
    return reward_model_reward(lambda ids, mask: score(params, ids, mask),
                               lambda p, c: render_pair(tokenizer, p, c), tokenizer.pad_token_id,
                               batch_size=256)


def policy_samples(model_dir: Path, prompts: list[str], num_samples: int,
                   chunk: int = 8) -> list[str]:
    """`num_samples` continuations of each prompt at T = 1, prompt-major, a few prompts at a
    time."""
    model, texts = load_pretrained(model_dir), []
    config = SamplingConfig(max_new_tokens=48, num_samples=num_samples)
    for start in range(0, len(prompts), chunk):
        texts += generate_from_text(model, tiny_tokenizer(), prompts[start:start + chunk],
                                    jax.random.key(start), config)[0]
    return texts


def train_proxy(run_dir: Path, sft_model: Path, validation: Path, *, size: int, seed: int,
                max_steps: int, batch: int, validation_pairs: int, eval_every: int) -> dict:
    """Train one proxy RM from the SFT model on `size` comparisons, early-stopped on the
    validation file's loss and exported at its lowest; return {"best_step", "epochs" (passes
    over the comparisons up to it), "steps" (trained), "best_loss"}."""
    train(load_config(report.ROOT / "configs/reward_sentiment.yaml", [
        f"model.path={sft_model}", f"data.synthetic_args.n={size}",
        f"data.synthetic_args.seed={seed}", f"data.eval={validation}",
        f"train.eval_every={eval_every}", f"train.eval_batches={validation_pairs // batch}",
        f"train.early_stopping_patience={PATIENCE}", "train.keep_best=true",
        f"train.steps={max_steps}", f"train.seed={seed}", f"train.batch_size={batch}",
        f"out_dir={run_dir}"]), progress=False)
    best = json.loads((run_dir / "best.json").read_text())
    return {"best_step": best["step"], "epochs": best["step"] * batch / size,
            "steps": report.metrics(run_dir, "eval")[-1]["step"], "best_loss": best["loss"]}


def run_study(out: Path, *, seeds: int, sft_steps: int, rm_steps: int, rm_batch: int = 32,
              sizes=SIZES, prompts: int = 64, num_samples: int = 512, held_out_pairs: int = 2048,
              validation_pairs: int = 1024, eval_every: int = EVAL_EVERY,
              smoke: bool = False) -> dict:
    """SFT, the M samples per prompt and their gold rewards, then each proxy RM (at most
    `rm_steps` updates): its held-out accuracy and best-of-n curve. Returns {"ns", "oracle",
    "ceiling", N: [per-seed result]}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    validation = out / "validation.jsonl"
    synthetic.sentiment_pairs(validation_pairs, seed=998).to_json(validation)
    sft_model = report.sft("sft_sentiment.yaml", out / "sft", sft_steps, smoke=smoke)
    openings = list(synthetic.sentiment(prompts, seed=12345)["prompt"])
    texts = policy_samples(sft_model, openings, num_samples)
    prompts_rep = [p for p in openings for _ in range(num_samples)]
    gold = np.asarray(synthetic.sentiment_reward(texts)).reshape(prompts, num_samples)
    ns = [2 ** k for k in range(int(np.log2(num_samples)))]  # 1 … M/2
    held_out = synthetic.sentiment_pairs(held_out_pairs, seed=999)
    results = {"ns": ns, "oracle": best_of_n_gold(gold, gold, ns),
               "ceiling": bayes_ceiling(held_out["score_chosen"], held_out["score_rejected"])}
    print(f"gold reward of the policy {gold.mean():+.3f}; Bayes ceiling of the held-out pairs "
          f"{results['ceiling']:.3f}", flush=True)
    for size in sizes:
        results[size] = []
        for seed in range(seeds):
            start, run_dir = time.perf_counter(), out / f"rm_{size}_seed{seed}"
            stopped = train_proxy(run_dir, sft_model, validation, size=size, seed=seed,
                                  max_steps=rm_steps, batch=rm_batch,
                                  validation_pairs=validation_pairs,
                                  eval_every=min(eval_every, max(1, size // rm_batch)))
            rm = proxy_scores(run_dir / "model")
            chosen = np.asarray(rm(prompts=held_out["prompt"], completions=held_out["chosen"]))
            rejected = np.asarray(rm(prompts=held_out["prompt"], completions=held_out["rejected"]))
            proxy = np.asarray(rm(prompts=prompts_rep,
                                  completions=texts)).reshape(prompts, num_samples)
            bon = best_of_n_gold(proxy, gold, ns)
            results[size].append({"accuracy": float(np.mean(chosen > rejected)), "bon": bon,
                                  "peak": fit_peak(ns, bon)[2], **stopped,
                                  "seconds": time.perf_counter() - start})
            print(f"N = {size:5d} seed {seed}: best of {stopped['steps']} updates at "
                  f"{stopped['best_step']}, held-out accuracy "
                  f"{results[size][-1]['accuracy']:.3f}, best-of-{ns[-1]} gold {bon[-1]:+.3f}",
                  flush=True)
    return results


def curve(results: dict, size: int) -> np.ndarray:
    """The best-of-n gold curve of the RMs trained on `size` comparisons, averaged over seeds."""
    return np.mean([r["bon"] for r in results[size]], axis=0)


def check(results: dict, sizes=SIZES) -> list[str]:
    """The paper's claims at this scale; an empty list when they hold."""
    failures = []
    accuracy = float(np.mean([r["accuracy"] for r in results[sizes[-1]]]))
    if results["ceiling"] - accuracy > CEILING_GAP:
        failures.append(f"the N = {sizes[-1]} proxy's held-out accuracy {accuracy:.3f} is more "
                        f"than {CEILING_GAP} below the Bayes ceiling {results['ceiling']:.3f}")
    learned = [size for size in sizes if not near_chance(results[size], results["ceiling"])]
    peaks = [fit_peak(results["ns"], curve(results, size))[2] for size in learned]
    if len(learned) < 3:
        failures.append(f"only {len(learned)} of the {len(sizes)} data sizes gave proxies nearer "
                        "the Bayes ceiling than chance; comparing where the gold reward peaks "
                        "needs three")
    elif any(later < earlier for earlier, later in zip(peaks, peaks[1:])) or peaks[-1] <= peaks[0]:
        failures.append("the gold reward does not peak later for more data: fitted √KL peaks "
                        + ", ".join(f"N = {s} {p:.2f}" for s, p in zip(learned, peaks)))
    return failures


def near_chance(proxies: list[dict], ceiling: float) -> bool:
    """Whether the proxies of one data size rank held-out comparisons nearer chance (½) than the
    Bayes ceiling, in mean accuracy."""
    return float(np.mean([r["accuracy"] for r in proxies])) <= (0.5 + ceiling) / 2


def results_table(results: dict, sizes=SIZES) -> str:
    ns = results["ns"]
    header = ("comparisons N", "kept update of trained (epochs), per seed",
              "lowest validation loss", "held-out accuracy",
              f"gold, best-of-{ns[-1]}", "peak n (grid)", "fitted α", "fitted β",
              "fitted √KL peak d*", "s / RM")
    lines = [f"Bayes ceiling of the held-out comparisons: {results['ceiling']:.3f}. Gold reward "
             f"of the policy (best-of-1): {results['oracle'][0]:+.3f}; of best-of-{ns[-1]} by the "
             f"gold reward itself: {results['oracle'][-1]:+.3f}.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        gold = curve(results, size)
        alpha, beta, peak = fit_peak(ns, gold)
        lines.append("| " + " | ".join([
            f"{size:,}", ", ".join(f"{r['best_step']} of {r['steps']} ({r['epochs']:.2g})"
                                   for r in results[size]),
            report.mean_se([r["best_loss"] for r in results[size]]),
            report.mean_se([r["accuracy"] for r in results[size]])
            + (" (near chance)" if near_chance(results[size], results["ceiling"]) else ""),
            report.mean_se([r["bon"][-1] for r in results[size]]), str(ns[int(np.argmax(gold))]),
            f"{alpha:.3f}", f"{beta:.3f}", "never" if np.isinf(peak) else f"{peak:.2f}",
            f"{np.mean([r['seconds'] for r in results[size]]):.0f}"]) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, sizes=SIZES):
    ns = results["ns"]
    d = np.sqrt(bon_kl(ns))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(d, results["oracle"], "k--", label="oracle (best-of-n by the gold reward)")
    for i, size in enumerate(sizes):
        gold = curve(results, size)
        alpha, beta, _ = fit_peak(ns, gold)
        ax.plot(d, gold, "o", color=f"C{i}", label=f"proxy RM, N = {size:,}")
        ax.plot(d, gold[0] + d * (alpha - beta * d), "-", color=f"C{i}", alpha=0.6)
    ax.set(title="best-of-n against proxy reward models",
           xlabel="√KL(best-of-n ‖ policy)  (nats^½)", ylabel="gold reward")
    ax.legend(fontsize=8)
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(
        __doc__, "rm_overoptimization", seeds=2, sft_steps=300,
        smoke="N ∈ {64, 128}, 8 RM steps, 1 seed, 4 prompts × 16 samples")
    parser.add_argument("--rm-steps", type=int, default=2048,
                        help="the most updates of 32 comparisons for any N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        sizes, seeds, sft_steps, rm_steps = (64, 128), 1, 20, 8
        kwargs = dict(rm_batch=8, prompts=4, num_samples=16, held_out_pairs=64,
                      validation_pairs=64, eval_every=2)
    else:
        sizes, seeds, sft_steps, rm_steps, kwargs = (SIZES, args.seeds, args.sft_steps,
                                                     args.rm_steps, {})
    start = time.perf_counter()
    results = run_study(args.runs, seeds=seeds, sft_steps=sft_steps, rm_steps=rm_steps, sizes=sizes,
                        smoke=args.smoke, **kwargs)
    paragraphs = __doc__.split("\n\n")
    rm_batch = kwargs.get("rm_batch", 32)
    setup = (f"{sft_steps} SFT steps; at most {rm_steps} RM updates of {rm_batch} comparisons "
             f"({rm_steps * rm_batch / sizes[-1]:g} epochs of the largest set); {seeds} seeds; "
             "mean ± standard error over seeds.")
    status = report.write(
        args.out, "rm_overoptimization", title="Reward-model over-optimisation (Gao et al. 2022) "
        "on the synthetic sentiment grammar", body="\n\n".join([*paragraphs[1:4], setup]),
        table=results_table(results, sizes), failures=check(results, sizes),
        claim="the largest proxy is near the Bayes ceiling, and among the proxies beyond chance "
        "the gold reward peaks later for those trained on more comparisons.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "rm_overoptimization.png", sizes)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
