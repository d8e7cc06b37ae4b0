"""What every paper reproduction shares: its command line, the reference policy it fine-tunes first,
mean ± SE cells, and the results file `<out>/<name>.md` with the setup, the table, the check (PASS
or FAIL) and the runtime."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np

from align_jax.config import load_config
from align_jax.train import train

ROOT = Path(__file__).parents[1]
# --smoke checks the pipeline, not the claims: a one-layer model compiles several times faster.
SMOKE_MODEL = ("model.init.num_hidden_layers=1",)


def argument_parser(doc: str, name: str, *, seeds: int, smoke: str | None = None,
                    sft_steps: int | None = None) -> argparse.ArgumentParser:
    """--seeds, --out (results, default experiments/results), --runs (default runs/<name>) and,
    when given, --smoke (`smoke` describes it) and --sft-steps; the experiment adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds)
    if sft_steps is not None:
        parser.add_argument("--sft-steps", type=int, default=sft_steps,
                            help="of the reference policy's SFT")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs") / name)
    if smoke:
        parser.add_argument("--smoke", action="store_true",
                            help=f"{smoke}: the pipeline, not the claims")
    return parser


def sft(config: str, out_dir: Path, steps: int, *overrides: str, smoke: bool = False) -> Path:
    """Fine-tune the reference policy from scratch with `configs/<config>` for `steps` steps (no
    evaluation); return the directory of the exported model."""
    train(load_config(ROOT / "configs" / config, [f"train.steps={steps}", "train.eval_every=0",
                                                  f"out_dir={out_dir}", *overrides,
                                                  *(SMOKE_MODEL if smoke else ())]), progress=False)
    return out_dir / "model"


def seed_sweep(seeds: int) -> list[str]:
    """The overrides that train seeds 0 … seeds-1 as the members of one vmapped run, each writing
    to `<out_dir>/seed=<k>/`."""
    return ["sweep.field=seed", f"sweep.values=[{','.join(map(str, range(seeds)))}]"]


def metrics(run_dir: Path, split: str) -> list[dict]:
    """The records of a run's `metrics.jsonl` logged for `split` ("train" or "eval"), in order."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["split"] == split]


def save_figure(fig, path: Path):
    """Lay out, write as PNG, and release the figure."""
    import matplotlib.pyplot as plt  # after the experiment has chosen the backend

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_and_se(values) -> tuple[float, float]:
    """The mean over seeds and its standard error (0 for one seed)."""
    values = np.asarray(values, float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def paired_change(before, after) -> tuple[float, float]:
    """mean(after − before) over paired items (problems, prompts) and its standard error."""
    d = np.asarray(after, float) - np.asarray(before, float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def mean_se(values, digits: int = 3) -> str:
    """'mean ± standard error' over seeds (± 0 for one seed)."""
    mean, se = mean_and_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def trajectory_table(runs: dict, at, *, first: str, column, digits: int = 3,
                     relative: bool = False) -> str:
    """Markdown: one row per run of trajectories [seeds, 1 + steps] (index s: after s steps), its
    mean ± SE over seeds at each step of `at` the trajectories reach, headed `column(s)`;
    `relative` subtracts each seed's start."""
    at = [s for s in at if s < next(iter(runs.values())).shape[1]]
    lines = [f"| {first} | " + " | ".join(map(column, at)) + " |", "|---|" + "---|" * len(at)]
    for name, x in runs.items():
        x = x - x[:, :1] if relative else x
        lines.append(f"| {name} | " + " | ".join(mean_se(x[:, s], digits) for s in at) + " |")
    return "\n".join(lines)


def machine() -> str:
    """What the run ran on: the accelerators by kind, or the CPU's model and core count (results
    differ between CPUs in the last bits, and a bistable check can flip with them)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} × {device.device_kind}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor())
    return f"CPU ({model}, {os.cpu_count()} cores)"


def write(out: Path, name: str, *, title: str, body: str, table: str, failures: list[str],
          claim: str, seconds: float) -> int:
    """Write `<out>/<name>.md` (the plot `<name>.png` is the caller's), print the table and the
    verdict, and return the exit status: 0 when the check passed, 1 when it failed."""
    verdict = (f"PASS: {claim}" if not failures
               else "FAIL:\n" + "\n".join(f"- {f}" for f in failures))
    runtime = f"Everything took {seconds / 60:.1f} min on {machine()}."
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"# {title}\n\n{body} {runtime}\n\n{table}\n\n"
                                    f"**Check.** {verdict}\n\n![{name}]({name}.png)\n")
    print(f"\n{table}\n\n{verdict}\n\nwrote {out / f'{name}.md'} ({seconds / 60:.1f} min)")
    return 0 if not failures else 1
