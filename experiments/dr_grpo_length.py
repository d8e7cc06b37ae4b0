"""GRPO's length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
Perspective", §3.1 and Fig. 5) at CPU scale, on the synthetic arithmetic task.

GRPO averages each completion's token losses before averaging over completions, so every token of
a completion of length |o| weighs 1/|o|: a wrong answer (negative advantage) is penalised less per
token the longer it is, and a right one (positive advantage) rewarded more per token the shorter
it is. Under GRPO, wrong answers should therefore grow longer relative to right ones. Dr. GRPO
sums the token losses over a constant length and drops the division by the group's reward std
(`rl.aggregation=token_sum_over_max_len`, `rl.scale_rewards=none`), which removes the bias.

To give length a free direction, the SFT data end each <think> with 0 … `--filler` " ." tokens
(`synthetic.arithmetic(filler=…)`), after the worked sum "a∘b=r": padding that changes neither
the answer nor the format, written once the model has committed to its answer, so it can depend on
it. From one SFT model, GRPO and Dr. GRPO train `--rollouts` rollouts for each of `--seeds` seeds;
the SFT model and every final model answer 256 fresh problems with 4 samples at T = 1. Two gaps,
wrong answers − right ones, are measured before and after: of the sampled lengths, and of the
filler count the model is expected to write after each sample's own worked sum, exact from its
next-token probabilities (`expected_filler`), which removes the sampling noise of lengths. Check,
on the filler gap: under GRPO it grows by more than two standard errors; under Dr. GRPO it grows
less than under GRPO and by no more than two standard errors.

Run: python -m experiments.dr_grpo_length [--rollouts 40] [--seeds 2] [--filler 12]
     [--out experiments/results] [--smoke]
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

from align_jax import rewards
from align_jax.config import load_config
from align_jax.data import synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, encode_prompts, generate_from_text
from align_jax.train import train
from experiments import dr_grpo_bandit, report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"GRPO": [],
           "Dr. GRPO": ["rl.scale_rewards=none", "rl.aggregation=token_sum_over_max_len"]}
TASK = {"digits": 1, "operators": "+-*"}
MAX_NEW_TOKENS = 48
WORK = re.compile(r"<think>-?\d+[-+*]-?\d+=-?\d+")  # the worked sum before the filler
MECHANISM = (
    "**The mechanism, on a tabular policy** (`experiments/dr_grpo_bandit.py`): the library's "
    "advantage, policy-loss and aggregation functions train a table of stopping hazards per answer "
    "(right with a fixed probability 0.25; 12 fixed tokens, the answer, then 0–12 fillers and a "
    "stop), with Adam at 1e-2 on 32 groups × 8 samples per on-policy update. The reward ignores "
    "length, so any gap is the aggregation's bias. Exact E[|o| | wrong] − E[|o| | right] in "
    "tokens, mean ± SE over 16 seeds trained as lanes of one vmapped program:")


def expected_filler(model, prompts: list[str], works: list[str], filler: int) -> np.ndarray:
    """E[k] of the filler count k ≤ `filler` the model writes after each prompt + work
    ("<think>a∘b=r"), exact from its next-token probabilities p_j of " ." after j fillers:
    E[k] = Σ_{m=1…filler} Π_{j<m} p_j. One forward pass of prompt + work + filler × " ." each."""
    tokenizer = tiny_tokenizer()
    [dot] = tokenizer(" .", add_special_tokens=False)["input_ids"]
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask)[:, -filler - 1:-1])
    out = []
    for i in range(0, len(prompts), 256):
        ids, mask = encode_prompts(tokenizer, [p + w + " ." * filler for p, w in
                                               zip(prompts[i:i + 256], works[i:i + 256])])
        p_BxK = jax.nn.softmax(forward(params, ids, mask).astype(jnp.float32))[..., dot]
        out.append(np.asarray(jnp.cumprod(p_BxK, axis=1).sum(axis=1)))
    return np.concatenate(out)


def lengths_by_correctness(model, problems, filler: int) -> dict:
    """Lengths (generated tokens, EOS included) of 4 samples per problem at T = 1, split by whether
    the answer is right, and the exact expected filler count after each well-formed sample's work
    (`expected_filler`; samples whose <think> does not open with "a∘b=r" are left out of it)."""
    prompts = [p for p in problems["prompt"] for _ in range(4)]
    texts, out = generate_from_text(model, tiny_tokenizer(), problems["prompt"], jax.random.key(0),
                                    SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, num_samples=4))
    right = np.array(rewards.accuracy(texts,
                                      [a for a in problems["answer"] for _ in range(4)])) == 1.0
    lengths = np.asarray(out.lengths_B, float)
    works = [WORK.match(t) for t in texts]
    formed = np.array([w is not None for w in works])
    fillers = np.full(len(texts), np.nan)
    fillers[formed] = expected_filler(model, [p for p, f in zip(prompts, formed) if f],
                                      [w.group(0) for w in works if w], filler)
    return {"right": lengths[right], "wrong": lengths[~right], "accuracy": float(right.mean()),
            "filler right": fillers[right & formed], "filler wrong": fillers[~right & formed]}


def run_study(out: Path, *, rollouts: int, seeds: int, sft_steps: int, filler: int,
              problems: int = 256, extra: tuple[str, ...] = (), smoke: bool = False) -> dict:
    """{"SFT": sample, method: [sample per seed]}, each method's seeds the members of one sweep,
    with each seed's share of its training time under "seconds"."""
    shutil.rmtree(out, ignore_errors=True)
    sft_model = report.sft("sft_arithmetic.yaml", out / "sft", sft_steps,
                           f"data.synthetic_args.filler={filler}", smoke=smoke)
    test = synthetic.arithmetic(problems, seed=12345, **TASK)
    results = {"SFT": lengths_by_correctness(load_pretrained(sft_model), test, filler)}
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
            sample = lengths_by_correctness(load_pretrained(run / f"seed={seed}" / "model"), test,
                                            filler)
            sample["seconds"] = seconds
            results[method].append(sample)
            print(f"{method:9s} seed {seed}: filler gap {gap(sample, 'filler')[0]:+.3f} tokens "
                  f"(SFT {gap(results['SFT'], 'filler')[0]:+.3f}), accuracy "
                  f"{sample['accuracy']:.3f}", flush=True)
    return results


MEASURES = {"length": ("right", "wrong"),  # sampled lengths
            "filler": ("filler right", "filler wrong")}  # exact E[filler] after the sample's work


def gap(sample: dict, measure: str = "length") -> tuple[float, float]:
    """mean(wrong) − mean(right) of a measure, and its standard error."""
    r, w = (sample[k] for k in MEASURES[measure])
    if len(w) < 2 or len(r) < 2:
        return float("nan"), float("nan")
    return float(w.mean() - r.mean()), float(np.sqrt(w.var(ddof=1) / len(w)
                                                     + r.var(ddof=1) / len(r)))


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def pooled(samples: list[dict]) -> dict:
    return {k: np.concatenate([s[k] for s in samples]) for keys in MEASURES.values() for k in keys}


def growth(results: dict) -> dict[str, tuple[float, float]]:
    """Each method's growth of the filler gap over the SFT model's, and its standard error."""
    base, base_se = gap(results["SFT"], "filler")
    out = {}
    for m in METHODS:
        g, se = gap(pooled(results[m]), "filler")
        out[m] = g - base, float(np.hypot(se, base_se))
    return out


def check(results: dict) -> list[str]:
    """The paper's claim at this scale, on the exact filler gap; an empty list when it holds."""
    grown = growth(results)
    failures = []
    g, se = grown["GRPO"]
    if not g > 2 * se:
        failures.append(f"under GRPO the filler gap grew by {g:+.3f} tokens, not more than 2 "
                        f"standard errors (2 × {se:.3f})")
    d, se_d = grown["Dr. GRPO"]
    if not d < g:
        failures.append(f"the filler gap grew more under Dr. GRPO ({d:+.3f}) than under GRPO "
                        f"({g:+.3f})")
    if d > 2 * se_d:
        failures.append(f"under Dr. GRPO the filler gap grew by {d:+.3f} tokens, more than 2 "
                        f"standard errors (2 × {se_d:.3f})")
    return failures


def fillers(sample: dict) -> np.ndarray:
    """The exact expected filler counts of right and wrong samples together."""
    return np.concatenate([sample[k] for k in MEASURES["filler"]])


def regime(results: dict, mechanism_holds: bool) -> str:
    """What the bias acts through, measured on the language model: a filler count that depends on
    whether the sample's own answer is right (the tabular policy holds a stopping hazard per
    answer). The conclusion is drawn only when the tabular policy shows the bias and GRPO's filler
    gap did not grow beyond two standard errors."""
    sft, sft_se = gap(results["SFT"], "filler")
    moved = []
    for m in METHODS:
        both = pooled(results[m])
        g, se = gap(both, "filler")
        moved.append(f"under {m} {g:+.3f} ± {se:.3f}, while every answer's filler moved by "
                     f"{_mean(fillers(both)) - _mean(fillers(results['SFT'])):+.2f}")
    text = ("**What the bias acts through.** On the tabular policy a wrong answer's length is its "
            "own stopping hazard, so the aggregation can lengthen wrong answers alone. The "
            "language model's filler gap (wrong − right) is "
            f"{sft:+.3f} ± {sft_se:.3f} tokens after SFT, and after training " + "; ".join(moved)
            + ".")
    g, se = growth(results)["GRPO"]
    if mechanism_holds and not g > 2 * se:
        text += (" Its filler does not come to depend on whether its own answer is right, which "
                 "the bias needs: the model is outside the mechanism's regime, and the tabular "
                 "test is the evidence that the code carries the bias and Dr. GRPO removes it.")
    return text


def results_table(results: dict) -> str:
    header = ("model", "accuracy (T=1)", "length, right", "length, wrong", "gap (wrong − right)",
              "E[filler], right", "E[filler], wrong", "filler gap (wrong − right)", "s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("SFT", [results["SFT"]])] + [(m, results[m]) for m in METHODS]
    for name, samples in rows:
        both = pooled(samples)
        cells = [f"{np.mean([s['accuracy'] for s in samples]):.3f}"]
        for measure, digits in (("length", 2), ("filler", 3)):
            g, se = gap(both, measure)
            cells += [f"{_mean(both[k]):.{digits}f}" for k in MEASURES[measure]]
            cells.append(f"{g:+.{digits}f} ± {se:.{digits}f}")
        seconds = (f"{np.mean([s['seconds'] for s in samples]):.0f}" if "seconds" in samples[0]
                   else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds} |")
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
    gaps = dr_grpo_bandit.run(**({"seeds": 2, "updates": 100} if args.smoke else {}))
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
        body=f"{paragraphs[1]}\n\n{paragraphs[2]}\n\n{setup}",
        table=f"{results_table(results)}\n\n{MECHANISM}\n\n{dr_grpo_bandit.table(gaps)}\n\n"
              f"{regime(results, not dr_grpo_bandit.check(gaps))}",
        failures=dr_grpo_bandit.check(gaps) + check(results),
        claim="under GRPO wrong answers grow longer relative to right ones; under Dr. GRPO they "
        "do not.", seconds=time.perf_counter() - start)
    plot(results, args.out / "dr_grpo_length.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
