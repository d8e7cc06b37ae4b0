"""Whole runs: exact resume, non-finite stops, SIGTERM, the CLI, config errors and exports."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from align_jax.config import ConfigError, load_config
from align_jax.models import load_pretrained
from align_jax.train import NonFiniteError, train

ROOT = Path(__file__).parents[2]
TINY = ["model.init.hidden_size=32", "model.init.intermediate_size=64",
        "model.init.num_hidden_layers=2", "data.synthetic_args.n=200", "train.batch_size=8",
        "train.log_every=1", "data.max_length=64", "data.buckets=[64]"]


def config(out, *extra, base="configs/sft_arithmetic.yaml"):
    return load_config(ROOT / base, TINY + [f"out_dir={out}", *extra])


def weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    extra = ["train.steps=6", "train.micro_batches=2", "train.eval_every=0"]
    train(config(tmp_path / "straight", *extra), progress=False)
    train(config(tmp_path / "resumed", *extra), progress=False, max_updates=4)
    assert not (tmp_path / "resumed" / "model").exists()  # stopped early: no export yet
    train(config(tmp_path / "resumed", *extra), progress=False, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    logged = [json.loads(line)
              for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_dpo_run_with_precomputed_reference_and_eval_split(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a real W&B run, written locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, "train.steps=3", "data.synthetic_args.n=64", "data.eval_fraction=0.25",
                 "loss.precompute_ref_logps=true", "train.wandb_project=align-jax-tests",
                 "train.log_every=1", base="configs/dpo_sentiment.yaml")
    metrics = train(cfg, progress=False)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "eval_loss"} <= metrics.keys()
    # a real HF export
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "tb").is_dir() and (tmp_path / "config.yaml").is_file()
    run_id = (tmp_path / "wandb_run_id").read_text()
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    logged = run_file.read_bytes()  # W&B's protobuf records hold keys and names as plain bytes
    assert all(key in logged for key in (b"train/loss", b"train/rewards/margins", b"eval/loss",
                                         b"align-jax-tests"))


def test_eval_on_start_logs_the_starting_model_as_step_0(tmp_path):
    """DPO's policy starts as its reference: step 0's eval loss is ln 2 and its margins 0."""
    cfg = config(tmp_path, "train.steps=2", "data.synthetic_args.n=64", "data.eval_fraction=0.25",
                 "train.eval_on_start=true", "train.lr=1e-3", base="configs/dpo_sentiment.yaml")
    train(cfg, progress=False)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    np.testing.assert_allclose(evals[0]["loss"], np.log(2), rtol=1e-6)
    assert abs(evals[0]["rewards/margins"]) < 1e-5 < 1e-4 < abs(evals[1]["rewards/margins"])


def test_keep_best_exports_the_lowest_eval_loss_and_patience_ends_the_run(tmp_path):
    """Two steps lower the eval loss; resumed with a negative learning rate (gradient ascent) the
    next two raise it, so the run stops two evaluations after its best and exports the model of
    step 2, which a 2-step run equals bit for bit."""
    common = ["data.eval_fraction=0.25", "train.eval_every=1", "train.schedule=constant",
              "train.eval_batches=2"]
    train(config(tmp_path / "two", "train.steps=2", "train.lr=1e-3", *common), progress=False)
    kept = tmp_path / "kept"
    extra = ["train.steps=8", "train.keep_best=true", "train.early_stopping_patience=2", *common]
    train(config(kept, "train.lr=1e-3", *extra), progress=False, max_updates=2)
    train(config(kept, "train.lr=-1e-2", *extra), progress=False, resume=True)
    evals = [r for r in map(json.loads, (kept / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    assert evals[1]["loss"] < evals[0]["loss"] and min(evals[2]["loss"], evals[3]["loss"]) > \
        evals[1]["loss"]
    assert json.loads((kept / "best.json").read_text()) == {"step": 2, "loss": evals[1]["loss"]}
    a, b = weights(tmp_path / "two"), weights(kept)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("extra, message", [
    (["train.keep_best=true", "data.eval_fraction=0.25"], "train.keep_best=True needs evaluations"),
    (["train.early_stopping_patience=2"], "train.early_stopping_patience=2 needs evaluations"),
    (["train.early_stopping_patience=-1", "data.eval_fraction=0.25", "train.eval_every=1"],
     "expected a number of evaluations >= 0"),
])
def test_best_settings_without_evaluations_are_named_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path, "train.steps=2", "train.eval_every=0", *extra[:1], *extra[1:]),
              progress=False)


def test_wandb_project_without_wandb_installed_is_a_named_error(tmp_path, monkeypatch):
    # what `import wandb` meets when it is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = config(tmp_path, "train.wandb_project=p", base="configs/dpo_sentiment.yaml")
    with pytest.raises(ConfigError, match=r"train.wandb_project needs the wandb package: "
                                          r"pip install 'align_jax\[wandb\]'"):
        train(cfg, progress=False)


def test_sweep_trains_each_member_as_its_own_run(tmp_path):
    """A β sweep as lanes of one vmapped program, interrupted after 2 of 3 steps and resumed, gives
    each member the metrics and the exported weights of its own uninterrupted run."""
    extra = ["train.steps=3", "data.synthetic_args.n=64", "data.eval_fraction=0.25"]
    dpo = "configs/dpo_sentiment.yaml"
    swept_cfg = config(tmp_path / "sweep", *extra, "sweep.field=beta", "sweep.values=[0.1,0.5]",
                       base=dpo)
    train(swept_cfg, progress=False, max_updates=2)
    assert not (tmp_path / "sweep" / "beta=0.1" / "model").exists()  # stopped early: no export yet
    swept = train(swept_cfg, progress=False, resume=True)
    assert list(swept) == ["beta=0.1", "beta=0.5"]
    assert swept["beta=0.1"]["loss"] != swept["beta=0.5"]["loss"]
    for beta in ("0.1", "0.5"):
        alone = train(config(tmp_path / beta, *extra, f"loss.beta={beta}", base=dpo),
                      progress=False)
        member = swept[f"beta={beta}"]
        for key in ("loss", "grad_norm", "eval_loss", "eval_rewards/accuracies"):
            np.testing.assert_allclose(member[key], alone[key], rtol=1e-5, atol=1e-6, err_msg=key)
        # margins = β·((c − c_ref) − (r − r_ref)) cancels four summed log-probs of size |logps|
        # (≈ 90, margins ≈ 1e-4): each is known to about one float32 ulp, an error absolute, not
        # relative to the small margin (measured: at most 0.11 of this bound, which is about 7% of
        # the margin).
        logps = max(abs(alone["logps/chosen"]), abs(alone["logps/rejected"]))
        ulps = 4 * float(beta) * np.finfo(np.float32).eps * logps
        np.testing.assert_allclose(member["rewards/margins"], alone["rewards/margins"], rtol=1e-5,
                                   atol=ulps, err_msg="rewards/margins")
        a, b = weights(tmp_path / "sweep" / f"beta={beta}"), weights(tmp_path / beta)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        logged = (tmp_path / "sweep" / f"beta={beta}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["split"] for line in logged] == ["train"] * 3 + ["eval"]


@pytest.mark.parametrize("overrides, message", [
    (["sweep.field=label_smoothing", "sweep.values=[0.1]"], "sweep.field must be one of"),
    (["sweep.field=beta"], "sweep.values is empty"),
    (["sweep.values=[0.1]"], "sweep.values is set but sweep.field is not"),
    (["sweep.field=beta", "sweep.values=[0.1,0.10]"], "repeated values"),
    (["sweep.field=seed", "sweep.values=[1,2]"], "sweep.field must be one of .* for "
                                                  "train.method=dpo"),
    (["sweep.field=max_new_tokens", "sweep.values=[8]", "train.method=grpo"],
     "sweep.field must be one of"),
    (["sweep.field=seed", "sweep.values=[1,2.5]", "train.method=grpo"],
     "seeds are non-negative integers"),
])
def test_bad_sweeps_are_named_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path, "train.steps=1", *overrides, base="configs/dpo_sentiment.yaml"),
              progress=False)


def test_non_finite_loss_stops_and_leaves_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, "train.steps=20", "train.lr=1e12", "train.max_grad_norm=null",
                 "train.warmup_steps=0", "train.schedule=constant", "train.checkpoint_every=1")
    with pytest.raises(NonFiniteError, match=r"step (\d+): non-finite loss or gradient on the "
                                             r"batch at LoaderState"):
        train(cfg, progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 20  # the checkpoints before the bad step are kept, none after


def test_kto_and_reward_model_runs(tmp_path):
    kto = train(config(tmp_path / "kto", "train.steps=2", base="configs/kto_sentiment.yaml"),
                progress=False)
    assert {"kl", "rewards/chosen", "loss"} <= kto.keys()
    rm = train(config(tmp_path / "rm", "train.steps=2", base="configs/reward_sentiment.yaml"),
               progress=False)
    assert {"accuracy", "margin", "loss"} <= rm.keys()
    # The exported reward model scores right-padded text in transformers as the trainer did.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm" / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm" / "model")
    batch = tokenizer(["the plot was good .",
                       "the acting was not very awful and the music was great ."],
                      padding=True, return_tensors="np")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(batch["input_ids"]),
                    attention_mask=torch.tensor(batch["attention_mask"])).logits[:, 0].numpy()
    ours = load_pretrained(tmp_path / "rm" / "model").score(jnp.asarray(batch["input_ids"]),
                                                             jnp.asarray(batch["attention_mask"]))
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(theirs[0], theirs[1])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'trian'"):
        load_config(ROOT / "configs/sft_arithmetic.yaml", ["trian.lr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'train.steps': Value 'many'"):
        load_config(bad)


def test_cli_trains_and_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "align_jax", "train", "configs/sft_arithmetic.yaml", *TINY,
           "train.steps=100000", f"out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while (not (metrics.exists() and metrics.read_text().count("\n") >= 2)
           and time.time() < deadline):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "continue with --resume" in err
    assert any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
    bad = subprocess.run([sys.executable, "-m", "align_jax", "train", "configs/sft_arithmetic.yaml",
                          "train.lr=x"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "key 'train.lr'" in bad.stderr


def test_bfloat16_compute_trains_with_float32_master_weights(tmp_path):
    metrics = train(config(tmp_path, "train.steps=3", "model.dtype=bfloat16"), progress=False)
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite"] == 0
    assert all(w.dtype == np.float32 for w in weights(tmp_path).values())
