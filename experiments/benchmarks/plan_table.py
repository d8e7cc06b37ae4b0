"""Will it fit? `align-jax plan` for real model sizes on TPU slices, as a Markdown table.

Each row compiles a run's programs ahead of time (libtpu, compile-only devices; no TPU needed) from
a config in `configs/` with overrides: the model's `config.json` from `configs/models/`, bfloat16
compute, parameters and optimizer state sharded over every chip (fsdp). DPO: 8 pairs × 1024 tokens,
packed (prompt | chosen | rejected in one row). GRPO: 8 prompts × 8 samples, 256 prompt + 512 new
tokens, 4 mini-batches, β = 0.04 (a reference model). Writes experiments/results/plan_table.md.

    python -m experiments.benchmarks.plan_table [--rows N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from align_jax.config import load_config
from align_jax.plan import plan
from align_jax.topology import GiB

ROOT = Path(__file__).parents[2]
RUNS = {
    "DPO": ("configs/dpo_sentiment.yaml", ["train.batch_size=8", "data.max_length=1024"]),
    "GRPO": ("configs/grpo_arithmetic.yaml", ["train.batch_size=8", "rl.num_generations=8",
                                              "data.max_length=256", "rl.max_new_tokens=512",
                                              "rl.mini_batches=4", "rl.beta=0.04"]),
}
ROWS = [  # (model, run, topology, extra overrides)
    ("llama-3.2-1b", "DPO", "v5e:2x2", []),
    ("llama-3.2-1b", "DPO", "v5e:2x2", ["model.remat=true"]),
    ("llama-3.2-1b", "DPO", "v5p:2x2x1", []),
    ("llama-3.2-1b", "GRPO", "v5e:2x2", []),
    ("llama-3.2-1b", "GRPO", "v5p:2x2x1", []),
    ("llama-3.1-8b", "DPO", "v5p:2x2x2", ["model.remat=true"]),
    ("llama-3.1-8b", "GRPO", "v5p:2x2x2", ["model.remat=true"]),
    ("llama-3.1-8b", "DPO", "v5e:2x4", ["model.remat=true"]),
]


def row(model: str, run: str, topology: str, extra: list[str]) -> str:
    config, overrides = RUNS[run]
    cfg = load_config(ROOT / config, [f"model.path={ROOT / 'configs/models' / model}",
                                      "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=-1",
                                      *overrides, *extra])
    start = time.perf_counter()
    result = plan(cfg, topology)
    seconds = time.perf_counter() - start
    step = result.programs[0]
    worst = max(result.programs, key=lambda p: p.peak_bytes if p.error is None else float("inf"))
    peak = "over HBM" if worst.error else f"{worst.peak_bytes / GiB:.1f}"
    where = f" ({worst.name})" if len(result.programs) > 1 else ""
    timing = ("-" if step.error is not None
              else f"{step.roofline_seconds:.2f} s, MFU ≤ {step.mfu_at_roofline:.0%}")
    state = sum(step.inputs.get(k, 0) for k in ("params", "optimizer", "reference"))
    hbm = result.hbm_bytes_per_device
    if result.fits:
        note = ""
    elif state > hbm / 2:
        note = f"weights and AdamW state take {state / GiB:.1f} of {hbm / GiB:.0f} GiB"
    else:
        note = "largest array: " + worst.largest[0].split(" at ")[0]
    return (f"| {model} | {run} | {' '.join(extra) or '-'} | {topology} | {state / GiB:.1f} | "
            f"{peak}{where} / {hbm / GiB:.0f} | {'yes' if result.fits else 'no'} | "
            f"{seconds:.0f} | {timing} | {note} |")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=len(ROWS), help="plan only the first N rows")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/plan_table.md"))
    args = parser.parse_args(argv)
    lines = ["| model | method | overrides | topology | weights + optimizer GiB per chip "
             "| peak GiB / HBM per chip | fits | compile s (2-core CPU) | train step roofline "
             "| why it does not fit |", "|" + "---|" * 10]
    for spec in ROWS[:args.rows]:
        lines.append(row(*spec))
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
