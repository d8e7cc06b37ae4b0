"""Rematerialisation, the chunked LM head, fused attention and unscanned layers change memory or
speed, never the numbers: every method's run with a remat policy (a different one per method, so
every policy runs in a real training loop), or with `model.logits_chunk=5` (the LM head over 5
positions at a time, padding the last chunk), SFT and DPO with splash attention, and DPO and GRPO
(sampling included) with `model.scan_layers=false`, follow the loss curve of the same run without
it, with or without a frozen reference model. A LoRA run of SFT, a reward model, KTO and PPO
starts from the plain run's model."""

import json
from pathlib import Path

import numpy as np
import pytest

from align_jax.config import load_config
from align_jax.train import train

ROOT = Path(__file__).parents[2]
TINY_MODEL = ["model.path=null", "model.init.vocab_size=384", "model.init.hidden_size=32",
              "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
              "model.init.num_attention_heads=4", "model.init.num_key_value_heads=2",
              "model.init.max_position_embeddings=256", "model.init.tie_word_embeddings=true"]
RUNS = {  # method -> (config, overrides that keep it small)
    "sft": ("sft_arithmetic", ["data.synthetic_args.n=64"]),
    "reward": ("reward_sentiment", ["data.synthetic_args.n=64"]),
    "dpo": ("dpo_sentiment", ["data.synthetic_args.n=64"]),
    "kto": ("kto_sentiment", ["data.synthetic_args.n=64"]),
    "grpo_with_reference": ("grpo_arithmetic", ["rl.beta=0.04", "rl.num_generations=4",
                                                "rl.max_new_tokens=8"]),
    "ppo": ("ppo_arithmetic", ["rl.reward_model=null", "rl.reward_funcs=[format]",
                               "rl.reward_weights=[1.0]", "rl.max_new_tokens=8",
                               "rl.num_iterations=2"]),
}


# Every policy's gradients equal none's in tests/models; here each runs in a training loop, with
# and without a reference model, with a scalar head and with an actor-critic pair.
REMAT = {"reward": "offload", "dpo": "dots", "grpo_with_reference": "true",
         "ppo": "dots_no_batch"}
CASES = [(m, "remat") for m in REMAT]
CASES += [(m, "chunked_head") for m in RUNS if m != "reward"]  # a reward model has no LM head
# Pallas splash attention (interpreted on CPU) on plain rows and on DPO's packed pairs
CASES += [("sft", "splash"), ("dpo", "splash")]
# separate blocks in place of the scan, for a reference model and for the sampler's KV cache
CASES += [("dpo", "unscanned"), ("grpo_with_reference", "unscanned")]
# one worker runs a method's cases, so its plain run is made once (`-n 2 --dist loadgroup`)
CASES = [pytest.param(m, v, marks=pytest.mark.xdist_group(f"memory_paths_{m}")) for m, v in CASES]
# LoRA for the methods tests/train/test_lora.py does not run (it runs DPO and GRPO)
LORA = [pytest.param(m, marks=pytest.mark.xdist_group(f"memory_paths_{m}"))
        for m in ("sft", "reward", "kto", "ppo")]


def train_rows(out: Path, method: str, *variant: str) -> list[dict]:
    """The logged train metrics of a short run of `method`, one dict per step."""
    config, extra = RUNS[method]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", TINY_MODEL + extra + [
        f"out_dir={out}", "train.steps=3", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=0", "data.eval_fraction=0", "data.max_length=64", "data.buckets=[64]",
        *variant])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def losses(out: Path, method: str, *variant: str) -> list[float]:
    return [r["loss"] for r in train_rows(out, method, *variant)]


@pytest.fixture(scope="module")
def plain_rows(tmp_path_factory):
    """Each method's plain run, once per test process."""
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = train_rows(tmp_path_factory.mktemp(method), method)
        return runs[method]
    return get


@pytest.mark.parametrize("method, variant", CASES)
def test_memory_path_follows_the_plain_loss_curve(method, variant, plain_rows, tmp_path):
    plain = [r["loss"] for r in plain_rows(method)]
    assert len(plain) == 3
    # The same float32 operations, recomputed or split into chunks: equal up to the reassociation
    # of XLA's fusions and of the head's gradient summed over chunks.
    override = {"remat": f"model.remat={REMAT.get(method)}", "chunked_head": "model.logits_chunk=5",
                "splash": "model.attention=splash", "unscanned": "model.scan_layers=false"}[variant]
    np.testing.assert_allclose(losses(tmp_path, method, override), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", LORA)
def test_lora_run_starts_from_the_plain_model_and_trains(method, plain_rows, tmp_path):
    """With adapters (B = 0 at the start) every method's first step is the plain run's: the same
    loss (PPO logs the mean over its two passes, so there the rollout's reward and KL, measured
    before any update); then the adapters, not the weights, are trained, so the curves part."""
    plain, lora = plain_rows(method), train_rows(tmp_path, method, "model.lora.rank=4",
                                                 "model.lora.alpha=8")
    for key in ("objective/rlhf_reward", "objective/kl") if method == "ppo" else ("loss",):
        np.testing.assert_allclose(lora[0][key], plain[0][key], rtol=1e-5, atol=1e-6)
    # after updates (the first may be at a warmup learning rate of 0), beyond the tolerance
    # within which the memory paths agree
    assert not np.isclose(lora[-1]["loss"], plain[-1]["loss"], rtol=1e-5, atol=0)
