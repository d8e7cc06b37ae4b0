"""Faults a long run meets, end to end: unreadable checkpoints, a resume with a changed config, a
kill after the last checkpoint, and a NaN mid-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import ConfigError, RunConfig, load_config, to_yaml
from align_jax.train import NonFiniteError, offline, train
from align_jax.train.host import (
    RESUMABLE,
    CheckpointError,
    Checkpoints,
    config_changes,
    trim_metrics,
)
from tests.train.test_run import ROOT, TINY, config, weights


def logged(out):
    """{split: [steps]} of metrics.jsonl, in file order."""
    steps = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["split"], []).append(record["step"])
    return steps


def saved_steps(out):
    return sorted(int(p.name) for p in (Path(out) / "checkpoints").iterdir() if p.name.isdigit())


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


CORRUPTIONS = {  # a checkpoint's step directory -> damaged in one way
    "truncated array file": lambda d: _truncate(_largest_array_file(d)),
    "deleted array index": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "truncated data position": lambda d: _truncate(d / "loader" / "metadata"),
    "empty step directory": lambda d: [p.unlink() for p in sorted(d.rglob("*"), reverse=True)
                                       if p.is_file()],
}


def _toy(step: int):
    """A small state (random, so its array file does not compress to nothing) and its shardings."""
    w = np.random.default_rng(step).standard_normal((64, 64)).astype(np.float32)
    state = {"step": jnp.int32(step), "w": jnp.asarray(w)}
    return state, jax.tree.map(lambda x: x.sharding, state)


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_resume_skips_an_unreadable_latest_checkpoint(corrupt, tmp_path, caplog):
    out = tmp_path
    checkpoints = Checkpoints(out, keep=5, resume=False)
    for step in (1, 2, 3):
        checkpoints.save(step, _toy(step)[0], {"epoch": 0, "step": step})
    CORRUPTIONS[corrupt](out / "checkpoints" / "3")

    checkpoints = Checkpoints(out, keep=5, resume=True)
    state, record = checkpoints.restore(*_toy(0))
    assert checkpoints.step == 2 and record == {"epoch": 0, "step": 2}
    np.testing.assert_array_equal(state["w"], _toy(2)[0]["w"])
    [warning] = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert f"checkpoint {out / 'checkpoints' / '3'} cannot be read" in warning
    assert f"resuming from {out / 'checkpoints' / '2'} instead" in warning
    assert (out / "unreadable_checkpoints" / "3").is_dir() \
        and not (out / "checkpoints" / "3").exists()
    checkpoints.save(3, _toy(3)[0], {"epoch": 0, "step": 3})  # the run saves that step anew
    assert Checkpoints(out, keep=5, resume=True).restore(*_toy(0))[1]["step"] == 3


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=5, resume=False)
    for step in (1, 2):
        checkpoints.save(step, _toy(step)[0], {"epoch": 0, "step": step})
    CORRUPTIONS["truncated array file"](tmp_path / "checkpoints" / "2")
    CORRUPTIONS["truncated data position"](tmp_path / "checkpoints" / "1")
    with pytest.raises(CheckpointError,
                       match=r"checkpoints: no checkpoint can be restored: step 2: ValueError: "
                             r".*; step 1: JSONDecodeError: .* \(to start over, choose another"):
        Checkpoints(tmp_path, keep=5, resume=True).restore(*_toy(0))
    assert saved_steps(tmp_path) == [1, 2] and not (tmp_path / "unreadable_checkpoints").exists()
    assert issubclass(CheckpointError, ConfigError)  # the CLI's one-line report, exit status 2


def test_corrupt_latest_checkpoint_resumes_from_the_one_before_exactly(tmp_path, caplog):
    """Checkpoints 2, 4, 6 with the last one truncated: --resume warns, continues from 4, logs
    steps 5 and 6 once, and ends with the weights of the uninterrupted run; with every checkpoint
    unreadable, the CLI says so in one line with exit status 2."""
    extra = ["train.steps=6", "train.checkpoint_every=2", "train.eval_every=0"]
    cfg = config(tmp_path, *extra)
    train(cfg, progress=False)
    straight = weights(tmp_path)
    CORRUPTIONS["truncated array file"](tmp_path / "checkpoints" / "6")
    train(cfg, progress=False, resume=True)
    assert any(f"checkpoint {tmp_path / 'checkpoints' / '6'} cannot be read" in r.getMessage()
               and f"resuming from {tmp_path / 'checkpoints' / '4'} instead" in r.getMessage()
               for r in caplog.records)
    assert logged(tmp_path)["train"] == [1, 2, 3, 4, 5, 6]
    resumed = weights(tmp_path)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
    assert saved_steps(tmp_path) == [2, 4, 6] \
        and (tmp_path / "unreadable_checkpoints" / "6").is_dir()

    for step in saved_steps(tmp_path):
        CORRUPTIONS["deleted array index"](tmp_path / "checkpoints" / str(step))
    cli = subprocess.run([sys.executable, "-m", "align_jax", "train", "configs/sft_arithmetic.yaml",
                          *TINY, *extra, f"out_dir={tmp_path}", "--resume"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    # Orbax's reader threads may print tracebacks of their own after a failed read, even on the
    # same line before ours (unflushed); ours is one line.
    [line] = [line for line in cli.stderr.splitlines() if "align-jax: error:" in line]
    line = line[line.index("align-jax: error:"):]
    assert line.startswith(f"align-jax: error: {tmp_path / 'checkpoints'}: no checkpoint can be "
                           f"restored: step 6: ")
    assert "; step 4: " in line and "; step 2: " in line and "tensorstore_spec" not in line


def test_resume_after_a_kill_logs_each_step_once(tmp_path):
    """A run killed after logging steps 5 and 6 (and evaluating at 6) but before checkpointing
    step 6: the resumed run cuts metrics.jsonl back to step 4 and logs 5 and 6 once."""
    cfg = config(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.eval_every=2",
                 "train.eval_batches=1")
    train(cfg, progress=False)
    assert logged(tmp_path) == {"train": [1, 2, 3, 4, 5, 6], "eval": [2, 4, 6]}
    # the kill: no checkpoint 6
    for p in sorted((tmp_path / "checkpoints" / "6").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "checkpoints" / "6").rmdir()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a record cut short by the kill
    train(cfg, progress=False, resume=True)
    assert logged(tmp_path) == {"train": [1, 2, 3, 4, 5, 6], "eval": [2, 4, 6]}
    assert [json.loads(line)["step"]
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 2, 3, 4, 4, 5, 6, 6]


def test_trim_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = ([{"split": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
               + [{"split": "eval", "step": 3}])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    trim_metrics(path, 3)
    assert len(path.read_text().splitlines()) == 4  # nothing after step 3: left as it is
    trim_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_refuses_a_changed_method_model_or_data_naming_each_key(tmp_path):
    train(config(tmp_path, "train.steps=2", "train.eval_every=0"), progress=False)
    saved = (tmp_path / "config.yaml").read_text()
    changed = config(tmp_path, "train.steps=2", "train.eval_every=0", "train.method=reward",
                     "model.init.hidden_size=64", "data.synthetic_args.n=100", "train.batch_size=4",
                     "train.lr=1e-3")
    with pytest.raises(ConfigError,
                       match=r"config.yaml: --resume with a config that differs from the one the "
                             r"checkpoints were trained with, in data.synthetic_args.n: 200 → 100; "
                             r"model.init.hidden_size: 32 → 64; train.batch_size: 8 → 4; "
                             r"train.method: 'sft' → 'reward'; only train.steps, ") as info:
        train(changed, progress=False, resume=True)
    # an allowed change is not named as refused
    assert "train.lr" not in str(info.value).split("; only")[0]
    # the record of the checkpoints' config is kept
    assert (tmp_path / "config.yaml").read_text() == saved


def test_resume_allows_schedule_and_bookkeeping_changes_and_logs_them(tmp_path, caplog):
    train(config(tmp_path, "train.steps=2", "train.eval_every=0"), progress=False)
    more = config(tmp_path, "train.steps=4", "train.eval_every=0", "train.lr=1e-3",
                  "train.log_every=2", "train.keep_checkpoints=2")
    metrics = train(more, progress=False, resume=True)
    assert np.isfinite(metrics["loss"]) and logged(tmp_path)["train"] == [1, 2, 4]
    [warning] = [r.getMessage() for r in caplog.records
                 if "resuming with a changed config" in r.getMessage()]
    for change in ("train.keep_checkpoints: 3 → 2", "train.log_every: 1 → 2",
                   "train.lr: 0.003 → 0.001", "train.steps: 2 → 4"):
        assert change in warning
    assert "steps: 4" in (tmp_path / "config.yaml").read_text()


def test_online_resume_refuses_a_changed_config(tmp_path):
    """rl.py checks the config before building anything: a GRPO run's checkpoints with a changed
    group size and reward are refused."""
    extra = ["train.batch_size=2", "rl.num_generations=2", "rl.max_new_tokens=8"]
    (tmp_path / "config.yaml").write_text(to_yaml(config(tmp_path, *extra,
                                                         base="configs/grpo_arithmetic.yaml")))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    changed = config(tmp_path, "train.batch_size=2", "rl.num_generations=4", "rl.max_new_tokens=8",
                     "rl.reward_funcs=[accuracy]", "rl.reward_weights=null",
                     base="configs/grpo_arithmetic.yaml")
    with pytest.raises(ConfigError,
                       match=r"differs from the one the checkpoints were trained with, in "
                             r"rl.num_generations: 2 → 4; rl.reward_funcs: "
                             r"\['accuracy', 'format'\] → \['accuracy'\]; "
                             r"rl.reward_weights: \[1.0, 0.5\] → None; only"):
        train(changed, progress=False, resume=True)


def test_resumable_keys_are_config_keys():
    defaults = to_yaml(RunConfig())
    for key in RESUMABLE:
        assert key in config_changes(defaults,
                                     load_config(None, [f"{key}={_other_value(key)}"])), key


def _other_value(key):
    return {"train.schedule": "linear", "train.wandb_project": "p", "model.remat": "true",
            "out_dir": "elsewhere", "train.lr": "0.5"}.get(key, "7")


def poison_step(monkeypatch, k: int):
    """The k-th train step of the next run gets a batch with no completion tokens: its loss is
    0/0 = NaN, so the step refuses the update as it would any non-finite one."""
    real = offline.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), [0]

        def poisoned(state, frozen, batch):
            calls[0] += 1
            if calls[0] == k:
                mask = batch.completion_mask_BxT
                batch = batch._replace(completion_mask_BxT=jax.device_put(
                    np.zeros(mask.shape, mask.dtype), mask.sharding))
            return step_fn(state, frozen, batch)
        return poisoned

    monkeypatch.setattr(offline, "jit_train_step", jit_train_step)


def test_nan_at_step_k_stops_with_a_resumable_checkpoint(tmp_path, monkeypatch):
    """A NaN at step 5 stops the run naming the step; it leaves checkpoints 3 (periodic) and 4 (the
    untouched state, before the bad batch); --resume without the NaN finishes with the weights of
    a run that never met it."""
    extra = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=0"]
    train(config(tmp_path / "straight", *extra), progress=False)
    out = tmp_path / "nan"
    with monkeypatch.context() as patch:
        poison_step(patch, 5)
        with pytest.raises(NonFiniteError,
                           match=r"^step 5: non-finite loss or gradient .*params were not updated"):
            train(config(out, *extra), progress=False)
    assert saved_steps(out) == [3, 4] and not (out / "model").exists()
    assert logged(out)["train"] == [1, 2, 3, 4]
    metrics = train(config(out, *extra), progress=False, resume=True)
    assert metrics["nonfinite"] == 0 and logged(out)["train"] == [1, 2, 3, 4, 5, 6]
    a, b = weights(tmp_path / "straight"), weights(out)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_cli_reports_a_non_finite_stop_in_one_line(tmp_path, monkeypatch, capsys):
    from align_jax import cli

    poison_step(monkeypatch, 2)
    status = cli.main(["train", str(ROOT / "configs/sft_arithmetic.yaml"), *TINY,
                       f"out_dir={tmp_path}", "train.steps=3", "train.eval_every=0"])
    err = capsys.readouterr().err
    assert status == 1
    assert "align-jax: stopped: step 2: non-finite loss or gradient" in err \
        and "Traceback" not in err
