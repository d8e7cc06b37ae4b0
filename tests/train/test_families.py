"""Every registered family trains: a DPO run (full, and LoRA) and a GRPO run (sampling included)
on a tiny random Gemma 2, Gemma 3, Mixtral and Qwen3-MoE built from `model.init`, through the
CLI's `train`. DPO starts at ln 2 (the policy is its reference), plus the router's weighted
load-balancing loss for the MoE families, and its exported model (adapters merged) gives
transformers the logits align_jax gives; GRPO's trainer scores the sampler's tokens with the
sampler's log-probs."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from align_jax.config import ConfigError, load_config
from align_jax.models import load_pretrained
from align_jax.train import train

ROOT = Path(__file__).parents[2]
SIZES = ["model.path=null", "model.init.vocab_size=384", "model.init.hidden_size=32",
         "model.init.intermediate_size=64", "model.init.num_attention_heads=4",
         "model.init.num_key_value_heads=2", "model.init.head_dim=8",
         "model.init.max_position_embeddings=256", "model.init.sliding_window=6"]
FAMILIES = {  # the features that set each family apart, at sizes that make them bite
    "gemma2": ["model.init.model_type=gemma2", "model.init.num_hidden_layers=2",
               "model.init.query_pre_attn_scalar=16", "model.init.attn_logit_softcapping=1.0",
               "model.init.final_logit_softcapping=2.0"],
    "gemma3_text": ["model.init.model_type=gemma3_text", "model.init.num_hidden_layers=3",
                    "model.init.layer_types=[sliding_attention,full_attention,sliding_attention]",
                    "model.init.rope_local_base_freq=100.0"],
    "mixtral": ["model.init.model_type=mixtral", "model.init.num_hidden_layers=2",
                "model.init.num_local_experts=4", "model.init.num_experts_per_tok=2",
                "model.router_aux_coef=0.5"],
    "qwen3_moe": ["model.init.model_type=qwen3_moe", "model.init.num_hidden_layers=2",
                  "model.init.num_experts=4", "model.init.num_experts_per_tok=2",
                  "model.init.moe_intermediate_size=16", "model.router_aux_coef=0.5"],
}
# DPO moves off ln 2 at its second step (no warmup, so its first update is a whole one); GRPO's
# checks are on its first rollout
STEPS = {"dpo": 2, "grpo": 1}
RUNS = {
    "dpo": ("dpo_sentiment", ["data.synthetic_args.n=32", "train.batch_size=8",
                              "data.max_length=64", "data.buckets=[64]", "train.warmup_steps=0"]),
    "grpo": ("grpo_arithmetic", ["train.batch_size=4", "rl.num_generations=4",
                                 "rl.max_new_tokens=8", "rl.beta=0.04"]),
}


def run(out: Path, family: str, method: str, *variant: str) -> list[dict]:
    config, extra = RUNS[method]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", SIZES + FAMILIES[family] + extra + [
        *variant,
        f"out_dir={out}", f"train.steps={STEPS[method]}", "train.log_every=1", "train.eval_every=0",
        "data.eval_fraction=0"])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


MOE = ("mixtral", "qwen3_moe")
ATTENTION_LORA = ["model.lora.rank=4", "model.lora.targets=[q_proj,k_proj,v_proj,o_proj]"]


@pytest.mark.parametrize("family, variant", [("gemma2", []), ("gemma3_text", ["model.lora.rank=4"]),
                                             ("mixtral", []), ("qwen3_moe", ATTENTION_LORA)])
def test_dpo_run_and_export(family, variant, tmp_path):
    rows = run(tmp_path, family, "dpo", *variant)
    router = 0.5 * rows[0]["aux_loss"] if family in MOE else 0.0
    assert rows[0]["loss"] == pytest.approx(math.log(2) + router, abs=1e-6)
    # by far more than float32 rounding (6e-8 at ln 2)
    assert np.isfinite(rows[-1]["loss"]) and abs(rows[-1]["loss"] - rows[0]["loss"]) > 1e-5
    exported = tmp_path / "model"
    assert (tmp_path / "adapter" / "adapter_config.json").exists() == bool(variant)
    assert json.loads((exported / "config.json").read_text())["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(1, 384, size=(2, 12))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(load_pretrained(exported)(jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_run(family, tmp_path):
    rows = run(tmp_path, family, "grpo")
    assert len(rows) == 1 and np.isfinite(rows[0]["loss"])
    assert rows[0]["sampling/sampler_trainer_logp_diff"] < 1e-4
    # the first rollout's policy is the reference; a tiny random router's near-ties may pick
    # another expert for a token when the trainer's batch rounds its logits differently
    assert rows[0]["kl"] < (1e-4 if family in MOE else 1e-6)
    assert ("aux_loss" in rows[0]) == (family in MOE)


def test_a_sweep_over_a_mixture_of_experts_is_one_clear_error(tmp_path):
    cfg = load_config(ROOT / "configs/dpo_sentiment.yaml", SIZES + FAMILIES["qwen3_moe"] + [
        f"out_dir={tmp_path}", "sweep.field=beta", "sweep.values=[0.1,0.5]"])
    with pytest.raises(ConfigError, match=r"sweep.field=beta: a sweep over a mixture-of-experts "
                                          r"model \(qwen3_moe\) is not supported"):
        train(cfg, progress=False)
