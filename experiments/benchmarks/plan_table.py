"""Will it fit? `align-jax plan` for real model sizes on TPU slices, as Markdown tables.

Each row compiles a run's programs ahead of time (libtpu, compile-only devices; no TPU needed) from
a config in `configs/` with overrides: the model's `config.json` from `configs/models/`, bfloat16
compute on float32 master weights and AdamW state, parameters and optimizer state sharded over
every chip (fsdp). The MFU is the model's FLOPs (no recomputation) over the roofline time's worth
of peak FLOP/s: an upper bound for the step. DPO pairs are packed (prompt | chosen | rejected in
one row of 2 × data.max_length tokens). GRPO: 256 prompt tokens, 4 mini-batches, β = 0.04 (a
reference model). The LoRA row trains rank-16 adapters on every projection of a frozen bf16 base,
which is also the reference. The MoE row's FLOPs count the experts each token runs (k of E).

The first table is the runs users ask about; the second takes one run, Llama-3.2-1B DPO on a
v5e 2x2 slice, and adds one memory saving at a time. Writes experiments/results/plan_table.md.

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
DPO = "configs/dpo_sentiment.yaml"
GRPO = "configs/grpo_arithmetic.yaml"
DPO_1B = ["train.batch_size=8", "data.max_length=1024"]
DPO_8B = ["train.batch_size=32", "data.max_length=2048", "model.remat=full",
          "model.logits_chunk=512", "model.attention=splash"]
FITS = [  # (model, config, topology, overrides)
    ("llama-3.2-1b", DPO, "v5e:2x2", [*DPO_1B, "model.remat=full"]),
    # the layer inputs remat keeps (2 GiB per chip) to host memory
    ("llama-3.1-8b", DPO, "v5e:4x4", [*DPO_8B, "model.remat=offload"]),
    ("llama-3.1-8b", DPO, "v5e:2x2", DPO_8B),
    ("llama-3.1-8b", DPO, "v5p:2x2x2", DPO_8B),
    ("qwen3-8b", GRPO, "v5p:2x2x2", ["train.batch_size=16", "rl.num_generations=8",
                                     "data.max_length=256", "rl.max_new_tokens=1024",
                                     "rl.mini_batches=4", "rl.beta=0.04", "model.remat=full",
                                     "model.logits_chunk=512"]),
    ("llama-3.1-8b", DPO, "v5e:2x4", [*DPO_8B, "model.lora.rank=16", "model.lora.alpha=32"]),
    # soft-capped scores through splash, 21 windowed and 21 global layers, a 256k vocabulary
    ("gemma-2-9b", DPO, "v5e:4x4", [*DPO_8B, "model.remat=offload"]),
    ("gemma-2-9b", DPO, "v5p:2x2x2", DPO_8B),
    # 128 experts, 8 per token: experts split 4 ways over the expert axis, the rest over fsdp
    ("qwen3-30b-a3b", DPO, "v5p:2x2x4", [*DPO_8B, "mesh.fsdp=4", "mesh.expert=4"]),
]
SAVINGS = [  # (what changes, overrides added to Llama-3.2-1B DPO 8 × 1024 on v5e:2x2)
    ("float32 compute", ["model.dtype=float32"]),
    ("bfloat16 compute, bf16 reference", []),
    ("+ chunked LM head", ["model.logits_chunk=256"]),
    ("+ remat dots_no_batch", ["model.logits_chunk=256", "model.remat=dots_no_batch"]),
    ("+ remat full", ["model.logits_chunk=256", "model.remat=full"]),
    ("+ remat offload", ["model.logits_chunk=256", "model.remat=offload"]),
    ("+ bf16 first moment", ["model.logits_chunk=256", "model.remat=full",
                             "train.mu_dtype=bfloat16"]),
    ("+ splash attention", ["model.logits_chunk=256", "model.remat=full",
                            "train.mu_dtype=bfloat16", "model.attention=splash"]),
    ("splash, remat none", ["model.logits_chunk=256", "train.mu_dtype=bfloat16",
                            "model.attention=splash"]),
]


def run_config(model: str, config: str, overrides: list[str]):
    """`config` on the model `configs/models/<model>`, bf16 compute, fsdp over every device."""
    return load_config(ROOT / config, [f"model.path={ROOT / 'configs/models' / model}",
                                       "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=-1",
                                       *overrides])


def planned(model: str, config: str, topology: str, overrides: list[str]):
    cfg = run_config(model, config, overrides)
    start = time.perf_counter()
    result = plan(cfg, topology)
    return result, time.perf_counter() - start


def _peak(result) -> str:
    worst = max(result.programs, key=lambda p: p.peak_bytes if p.error is None else float("inf"))
    where = f" ({worst.name})" if len(result.programs) > 1 else ""
    if worst.error is None:
        return f"{worst.peak_bytes / GiB:.1f}{where}"
    needs = "" if worst.needed_bytes is None else f", needs {worst.needed_bytes / GiB:.1f}"
    return f"over HBM{needs}{where}"


def _state(result) -> float:
    step = result.programs[0]
    return sum(step.inputs.get(k, 0) for k in ("params", "optimizer", "base", "reference")) / GiB


def _roofline(result) -> str:
    step = result.programs[0]
    return ("-" if step.error is not None
            else f"{step.roofline_seconds:.2f} s, MFU ≤ {step.mfu_at_roofline:.0%}")


def fits_row(model, config, topology, overrides) -> str:
    result, seconds = planned(model, config, topology, overrides)
    hbm = result.hbm_bytes_per_device / GiB
    if result.fits:
        note = ""
    elif _state(result) > hbm / 2:
        note = f"weights, AdamW state and reference take {_state(result):.1f} of {hbm:.0f} GiB"
    else:
        worst = max(result.programs, key=lambda p: p.error is not None)
        note = "largest array: " + worst.largest[0].split(" at ")[0]
    run = "DPO" if config == DPO else "GRPO"
    return (f"| {model} | {run} | {' '.join(overrides)} | {topology} | {_state(result):.1f} | "
            f"{_peak(result)} / {hbm:.0f} | {'yes' if result.fits else 'no'} | {seconds:.0f} | "
            f"{_roofline(result)} | {note} |")


def savings_row(change, overrides) -> str:
    result, seconds = planned("llama-3.2-1b", DPO, "v5e:2x2", [*DPO_1B, *overrides])
    step = result.programs[0]
    asked = step.temp_bytes if step.error is None else step.needed_bytes
    temps = "-" if asked is None else f"{asked / GiB:.1f}"
    return (f"| {change} | {' '.join(overrides) or '-'} | {_state(result):.1f} | {temps} | "
            f"{_peak(result)} | {'yes' if result.fits else 'no'} | {seconds:.0f} | "
            f"{_roofline(result)} |")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=len(FITS) + len(SAVINGS),
                        help="plan only the first N rows of the two tables")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/plan_table.md"))
    args = parser.parse_args(argv)
    tables = [
        (["| model | method | overrides | topology | weights + optimizer + reference GiB per chip "
          "| peak GiB / HBM per chip | fits | compile s (2-core CPU) | train step roofline "
          "| why it does not fit |", "|" + "---|" * 10], FITS, fits_row),
        (["| Llama-3.2-1B DPO 8 × 1024, v5e:2x2 | overrides | weights + optimizer + reference "
          "GiB per chip | temporaries GiB | peak GiB / 16 | fits | compile s | train step "
          "roofline |", "|" + "---|" * 8], SAVINGS, savings_row),
    ]
    lines, budget = [], args.rows
    for header, rows, make in tables:
        lines += ["", *header] if lines else header
        for spec in rows[:max(budget, 0)]:
            lines.append(make(*spec))
            print(lines[-1], flush=True)
        budget -= len(rows)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
