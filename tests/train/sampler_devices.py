"""GRPO on 8 CPU devices with the sampler on devices of its own (`rl.sampler_devices`), run as a
subprocess by test_sampler_devices.py: prints, as JSON, where the trainer's and the sampler's
parameters live and the metrics and weights of runs with and without a separate sampler."""

import json
import os
import sys
from pathlib import Path

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), \
    "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from align_jax.config import load_config  # noqa: E402
from align_jax.train import online, rl, train  # noqa: E402
from align_jax.train.session import Session  # noqa: E402

ROOT = Path(__file__).parents[2]
TINY = ["model.path=null", "model.init.vocab_size=384", "model.init.hidden_size=32",
        "model.init.intermediate_size=64", "model.init.num_attention_heads=4",
        "model.init.num_key_value_heads=2", "model.init.num_hidden_layers=2",
        "model.init.max_position_embeddings=256", "train.batch_size=8", "rl.num_generations=4",
        "rl.max_new_tokens=8", "train.steps=2", "train.log_every=1", "rl.beta=0.04",
        "rl.reward_funcs=[tests.train:token_reward]", "rl.reward_weights=null"]


def config(out: Path, *extra: str):
    return load_config(ROOT / "configs/grpo_arithmetic.yaml", [*TINY, *extra, f"out_dir={out}"])


def main(root: Path) -> dict:
    report = {}
    cfg = config(root / "placement", "mesh.data=4", "rl.sampler_devices=4")
    session = Session.open(cfg, resume=False)
    run, state = rl.build(session, online.ONLINE_METHODS["grpo"], None)
    ids = lambda devices: sorted(d.id for d in devices)  # noqa: E731
    report["trainer_devices"] = ids(jax.tree.leaves(state.params)[0].sharding.device_set)
    report["sampler_devices"] = ids(jax.tree.leaves(
        run.behaviour(state.params, False))[0].sharding.device_set)
    runs = {"shared": ["mesh.data=8"], "apart": ["mesh.data=4", "rl.sampler_devices=4"],
            "apart_async": ["mesh.data=4", "rl.sampler_devices=4", "rl.async_rollouts=true"]}
    for name, extra in runs.items():
        last = train(config(root / name, *extra), progress=False)
        weights = load_file(str(root / name / "model" / "model.safetensors"))
        report[name] = {"metrics": last,
                        "weights": {k: np.asarray(v).ravel()[:64].tolist()
                                    for k, v in sorted(weights.items())}}
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
