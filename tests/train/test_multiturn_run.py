"""Multi-turn runs from the example configs: GRPO against an environment resumes bitwise, PPO
trains on trajectories, tool runs log TRL's tool metrics, and bad settings are named errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from align_jax.config import ConfigError, load_config
from align_jax.train import train

ROOT = Path(__file__).parents[2]
# one worker trains the `guesser` (`-n 2 --dist loadgroup`)
pytestmark = pytest.mark.xdist_group("multiturn_run")


@pytest.fixture(scope="module")
def guesser(tmp_path_factory):
    """A tiny model briefly supervised on games of guess the number (it replies with numbers)."""
    out = tmp_path_factory.mktemp("sft_guess_number")
    train(load_config(ROOT / "configs/sft_guess_number.yaml", [
        f"out_dir={out}", "train.steps=30", "train.warmup_steps=5", "data.synthetic_args.n=200",
        "train.batch_size=8"]), progress=False)
    return out / "model"


def guess_config(out, model, *extra, base="configs/grpo_guess_number.yaml"):
    return load_config(ROOT / base, [
        f"out_dir={out}", f"model.path={model}", "train.batch_size=4", "rl.num_generations=4",
        "rl.max_turns=3", "rl.rollout_tokens=48", "train.log_every=1", *extra])


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_guess_number_grpo_resumes_bitwise(guesser, tmp_path):
    """3 rollouts straight = 1, interrupted, then 2 resumed: the environments are made afresh
    each rollout, so prompts, keys and turns continue exactly."""
    train(guess_config(tmp_path / "a", guesser, "train.steps=3"), progress=False)
    train(guess_config(tmp_path / "b", guesser, "train.steps=3"), progress=False, max_updates=1)
    train(guess_config(tmp_path / "b", guesser, "train.steps=3"), progress=False, resume=True)
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in "ab")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    last = [records(tmp_path / run)[-1] for run in "ab"]
    assert last[0]["step"] == last[1]["step"] == 3 and last[0]["reward"] == last[1]["reward"]
    assert {"turns/mean", "turns/max", "rewards/environment/mean"} <= set(last[0])
    assert max(r["turns/max"] for r in records(tmp_path / "a")) > 1
    # the sampler's log-probs over whole trajectories are the trainer's
    assert all(r["sampling/sampler_trainer_logp_diff"] < 1e-4 for r in records(tmp_path / "a"))


def test_ppo_trains_on_trajectories(guesser, tmp_path):
    last = train(guess_config(tmp_path, guesser, "train.method=ppo", "train.steps=2",
                              "rl.num_generations=1", "train.batch_size=8"), progress=False)
    assert np.isfinite(last["objective/scores"]) and last["turns/max"] > 1
    assert np.isfinite(last["loss/value"]) and last["sampling/sampler_trainer_logp_diff"] < 1e-4


def test_tool_run_logs_trls_tool_metrics(guesser, tmp_path):
    last = train(guess_config(tmp_path, guesser, "train.steps=1",
                              base="configs/grpo_tool_arithmetic.yaml"), progress=False)
    assert {"tools/call_frequency", "tools/failure_frequency", "rewards/accuracy/mean"} <= set(last)


@pytest.mark.parametrize("overrides, message", [
    (["rl.tools=[calculator]"], "rl.environment and rl.tools are both set"),
    (["rl.environment=null", "rl.max_turns=2"], "needs rl.environment or rl.tools"),
    (["rl.environment=no_such_env"], "rl.environment: unknown environment .no_such_env."),
    (["sweep.field=seed", "sweep.values=[0,1]"], "multi-turn rollouts"),
    (["rl.soft_overlong_cache=4"], "bounds each turn, not a trajectory"),
    (["rl.tools=[tests.train.test_multiturn_run:undocumented]", "rl.environment=null"],
     "'undocumented' cannot be described"),
])
def test_bad_multi_turn_settings_are_named_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(guess_config(tmp_path, tmp_path / "unused", *overrides), progress=False)


def undocumented(x: int) -> int:
    return x
