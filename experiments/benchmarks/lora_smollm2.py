"""LoRA against full fine-tuning on the real SmolLM2-135M-Instruct, through the CLI: time per
step, peak host memory and the train state's size, for DPO (`configs/dpo_smollm2.yaml`) and GRPO
(`configs/grpo_smollm2.yaml`, 64 new tokens).

Each run is `align-jax train` in a process of its own (its peak resident memory is that process's
`ru_maxrss`); the time per step is taken between the second and the last logged step (the first
includes compilation): t_k = k / steps_per_second at step k. The train state is what a checkpoint
holds, counted from the shapes: every weight with its AdamW moments, or the adapters with theirs,
in float32. LoRA: rank 16, α 32, every projection, the frozen base also the reference (GRPO here
has β = 0 and needs none).

Run: python -m experiments.benchmarks.lora_smollm2 [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
from flax import nnx

from align_jax.config import load_config
from align_jax.models import read_config
from align_jax.models.lora import TRAINABLE
from align_jax.train.host import decoder_factory
from align_jax.train.mesh import make_mesh

ROOT = Path(__file__).parents[2]
RUNS = {  # name -> (config, overrides)
    "DPO, LoRA r=16": ("configs/dpo_smollm2.yaml", []),
    "DPO, full": ("configs/dpo_smollm2.yaml", ["model.lora=null", "train.lr=1e-6"]),
    "GRPO, LoRA r=16": ("configs/grpo_smollm2.yaml", ["model.lora.rank=16",
                                                      "model.lora.alpha=32", "train.lr=1e-5"]),
    "GRPO, full": ("configs/grpo_smollm2.yaml", []),
}
SHORT = ["data.eval_fraction=0", "train.eval_every=0", "train.log_every=1",
         "train.checkpoint_every=0", "rl.max_new_tokens=64"]
# a child process: train, then print its own peak resident memory in KiB
CHILD = ("import resource, sys; from align_jax.cli import main; code = main(sys.argv[1:]); "
         "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def measure(config: str, overrides: list[str], steps: int, out: Path) -> dict:
    args = ["train", str(ROOT / config), *SHORT, *overrides, f"train.steps={steps}",
            f"out_dir={out}"]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    maxrss = int(done.stdout.rsplit("maxrss", 1)[1].split()[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["step"] / r.get("steps_per_second", r.get("rollouts_per_second"))
         for r in rows if r["split"] == "train"}
    return {"seconds_per_step": (t[steps] - t[2]) / (steps - 2),
            "peak_rss_gib": maxrss / 2**20, "state_mib": state_bytes(config, overrides) / 2**20}


def state_bytes(config: str, overrides: list[str]) -> int:
    """Bytes of the trained parameters and their two AdamW moments, float32."""
    cfg = load_config(ROOT / config, overrides)
    make = decoder_factory(cfg, read_config(cfg.model.path), make_mesh())
    model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    trained = nnx.split(model, TRAINABLE, ...)[1] if cfg.model.lora else nnx.state(model)
    return 3 * 4 * sum(x.size for x in jax.tree.leaves(trained))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps (rollouts) per run, >= 3")
    args = parser.parse_args(argv)
    lines = ["| run | s / step | peak RSS GiB | train state MiB |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (config, overrides)) in enumerate(RUNS.items()):
            m = measure(config, overrides, args.steps, Path(tmp) / str(i))
            lines.append(f"| {name} | {m['seconds_per_step']:.2f} | {m['peak_rss_gib']:.2f} | "
                         f"{m['state_mib']:.0f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
