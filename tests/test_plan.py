"""`align-jax plan`: compile-only TPU programs for every method, a hand count of the sharded
parameter and optimizer bytes, out-of-memory as exit 3 naming the largest arrays, config errors as
exit 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_jax import cli
from align_jax.config import load_config
from align_jax.plan import plan
from tests.train.test_memory_paths import TINY_MODEL

ROOT = Path(__file__).parents[1]
METHODS = {  # name -> (config, overrides)
    "sft": ("sft_arithmetic", []),
    "dpo_packed": ("dpo_sentiment", ["data.share_prompt=true"]),
    "dpo_splash": ("dpo_sentiment", ["model.attention=splash"]),
    "dpo_sweep": ("dpo_sentiment", ["sweep.field=beta", "sweep.values=[0.1,0.5]"]),
    "dpo_precomputed_reference": ("dpo_sentiment", ["loss.precompute_ref_logps=true"]),
    "reward": ("reward_sentiment", []),
    "kto": ("kto_sentiment", []),
    "grpo": ("grpo_arithmetic", ["rl.beta=0.04", "rl.num_generations=4", "rl.max_new_tokens=16"]),
    "ppo": ("ppo_arithmetic", ["rl.reward_model=null", "rl.max_new_tokens=16"]),
}
EXPECTED = {"sft": ["train_step"], "dpo_packed": ["train_step"], "dpo_splash": ["train_step"],
            "dpo_sweep": ["train_step"],
            "dpo_precomputed_reference": ["train_step", "reference_logps"],
            "reward": ["train_step"], "kto": ["train_step"],
            "grpo": ["update_rollout", "generate", "prepare_rollout"],
            "ppo": ["update_rollout", "generate", "prepare_rollout"]}


def tiny(config, *extra):
    return load_config(ROOT / "configs" / f"{config}.yaml",
                       [*TINY_MODEL, "train.batch_size=8", "data.max_length=32", "mesh.data=1",
                        "mesh.fsdp=4", *extra])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_compiles_and_fits_a_v5e_slice(method):
    config, extra = METHODS[method]
    result = plan(tiny(config, *extra), "v5e:2x2")
    assert result.fits and result.device_kind == "TPU v5 lite" and result.num_devices == 4
    assert [p.name for p in result.programs] == EXPECTED[method]
    for p in result.programs:
        weights = p.inputs.get("params", p.inputs.get("reference"))
        assert p.peak_bytes > weights > 0 and p.flops > 0 and p.roofline_seconds > 0, p
        assert 0 < p.mfu_at_roofline <= 1
    step = result.programs[0]
    assert step.alias_bytes > 0  # the old state is donated to the new one
    if method == "grpo":  # 2 layers × keys and values × 32 rows × 2 kv heads × 48 slots × 8, f32
        generate = result.programs[1]  # (+ the slots' mask and the index), rows over 4 devices
        assert generate.inputs["kv_cache"] == (2 * 2 * 32 * 2 * 48 * 8 * 4 + 32 * 48 + 4) // 4
        assert generate.inputs["kv_cache"] < generate.temp_bytes
    if method == "dpo_sweep":  # two members' states, one reference
        assert step.inputs["params"] == 2 * tiny_param_bytes_per_device()
        assert step.inputs["reference"] == tiny_param_bytes_per_device()


def tiny_param_bytes_per_device() -> int:
    """The tiny model's float32 parameters, by hand; fsdp=4 splits every parameter's `embed` axis
    (32 = 4 × 8) over the 4 devices."""
    V, D, F, L, Q, K, H = 384, 32, 64, 2, 4, 2, 8
    # q, k, v, o, gate/up/down, 2 norms
    layer = D * Q * H + 2 * D * K * H + Q * H * D + 3 * D * F + 2 * D
    count = V * D + L * layer + D  # tied embedding, blocks, final norm
    return count * 4 // 4


def test_parameter_and_optimizer_bytes_equal_a_hand_count():
    result = plan(tiny("sft_arithmetic"), "v5e:2x2")
    step = result.programs[0]
    assert step.inputs["params"] == tiny_param_bytes_per_device()
    # AdamW's two moments, and two int32 step counts (Adam's and the schedule's), replicated
    assert step.inputs["optimizer"] == 2 * step.inputs["params"] + 2 * 4
    assert result.hbm_bytes_per_device == 16 * 2**30


def test_flops_equal_a_hand_count_of_the_matrix_products():
    V, D, F, L, Q, K, H = 384, 32, 64, 2, 4, 2, 8
    B, T = 8, 32  # rows of the largest bucket; the LM head predicts the last T − 1 positions
    R = B * T
    down_proj = 2 * R * F * D
    layer = 2 * R * (D * Q * H + 2 * D * K * H + Q * H * D + 2 * D * F) + down_proj \
        + 2 * 2 * B * Q * T * T * H  # q·kᵀ and probs·v
    forward = L * layer + 2 * B * (T - 1) * D * V
    # Backward: two products the size of each forward one (for the input and the weight).
    plain, remat = (plan(tiny("sft_arithmetic", f"model.remat={r}"), "v5e:2x2").programs[0]
                    for r in ("none", "full"))
    assert plain.flops * 4 == 3 * forward  # over the 4 devices
    # remat=full recomputes each layer's forward except down_proj, whose output the backward
    # pass does not need.
    assert remat.flops * 4 == 3 * forward + L * (layer - down_proj)
    assert remat.model_flops == plain.model_flops == plain.flops  # MFU counts no recomputation


def test_bfloat16_keeps_float32_masters_and_halves_the_reference_and_first_moment():
    result = plan(tiny("dpo_sentiment", "model.dtype=bfloat16", "train.mu_dtype=bfloat16"),
                  "v5e:2x2")
    step = result.programs[0]
    assert step.inputs["params"] == tiny_param_bytes_per_device()  # float32 master weights
    assert step.inputs["reference"] == tiny_param_bytes_per_device() // 2  # frozen, bfloat16
    # AdamW's first moment in bfloat16, its second in float32, two int32 step counts
    assert step.inputs["optimizer"] == 3 * step.inputs["params"] // 2 + 2 * 4


def test_a_run_that_does_not_fit_exits_3_naming_its_largest_arrays(tmp_path, capsys):
    report = tmp_path / "plan.json"
    # 8 sequences per device × 4096 tokens × a 128256-token vocabulary: 16.8 GB of float32 logits
    status = cli.main(["plan", str(ROOT / "configs/sft_arithmetic.yaml"), "--topology", "v5e:2x2",
                       "--json", str(report), *TINY_MODEL, "model.init.vocab_size=128256",
                       "model.init.num_hidden_layers=1", "model.init.max_position_embeddings=4096",
                       "train.batch_size=32", "data.max_length=4096", "mesh.data=4"])
    out = capsys.readouterr().out
    assert status == 3
    assert "train_step does not fit: RESOURCE_EXHAUSTED" in out
    largest = out.split("does not fit:", 1)[1]
    # the logits, and where
    assert "float32[32,4095,128256]" in largest and "(token_logps)" in largest
    assert "model.logits_chunk=256" in out and "model.remat=full" in out
    saved = json.loads(report.read_text())
    assert (saved["fits"] is False and saved["topology"] == "v5e:2x2"
            and saved["device_kind"] == "TPU v5 lite")
    assert {"peak_bytes_per_device", "hbm_bytes_per_device", "flops_per_device", "compile_seconds",
            "programs"} <= saved.keys()
    assert saved["programs"][0]["largest"]
    # what the compiler asked for: at least one device's logits
    assert saved["programs"][0]["needed_bytes"] >= 8 * 4095 * 128256 * 4


def test_a_fitting_plan_exits_0_and_writes_json(tmp_path, capsys):
    report = tmp_path / "plan.json"
    status = cli.main(["plan", str(ROOT / "configs/dpo_sentiment.yaml"), "--topology", "v5e:2x2",
                       "--json", str(report), *TINY_MODEL, "train.batch_size=8", "mesh.data=2",
                       "mesh.fsdp=2"])
    assert status == 0
    saved = json.loads(report.read_text())
    assert saved["fits"] and saved["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    assert 0 < saved["peak_bytes_per_device"] < saved["hbm_bytes_per_device"]
    assert math.isclose(saved["flops_per_device"], saved["programs"][0]["flops"])
    assert "train_step" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--topology", "v9x:2x2"], "--topology 'v9x:2x2'"),
    (["--topology", "v5e:2x2", "train.batch_size=6", "mesh.data=4"],
     "train.batch_size=6 does not split"),
    (["--topology", "v5e:2x2", "model.path=configs"], "no config.json"),
    (["--topology", "v5e:2x2", "mesh.fsdp=3"], "mesh:"),
    (["--topology", "v5e:2x2", "model.path=null", "model.init.model_type=mixtral",
      "model.init.num_local_experts=2", "mesh.data=1", "mesh.expert=4"],
     "mesh.expert=4 does not divide the model's num_experts=2 (mixtral)"),
])
def test_config_errors_exit_2(extra, message, capsys):
    assert cli.main(["plan", str(ROOT / "configs/sft_arithmetic.yaml"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_model_path_needs_only_config_json(tmp_path):
    hf = json.loads((ROOT / "configs/models/llama-3.2-1b/config.json").read_text())
    hf.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps(hf))  # no weights beside it
    result = plan(load_config(ROOT / "configs/sft_arithmetic.yaml", [
        f"model.path={tmp_path}", "train.batch_size=4", "data.max_length=32"]), "v5e:2x2")
    assert result.fits and result.programs[0].inputs["params"] > 0


def test_a_gpu_node_compiles_without_a_gpu(tmp_path):
    """`h100:8` through JAX's CUDA plugin, which `make install-test` keeps in .venv/cuda-plan (in
    the environment it would log in every process), in a process of its own."""
    plugin = ROOT / ".venv" / "cuda-plan"
    assert (plugin / "jax_plugins").is_dir(), \
        "make install-test installs JAX's CUDA plugin in .venv/cuda-plan"
    report = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "align_jax.cli", "plan",
                          "configs/dpo_sentiment.yaml", "--topology", "h100:8", "--json",
                          str(report), *TINY_MODEL, "train.batch_size=8", "data.max_length=32",
                          "mesh.data=2", "mesh.fsdp=4"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(plugin)),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(report.read_text())
    assert (saved["fits"] and saved["device_kind"] == "NVIDIA H100 80GB HBM3"
            and saved["num_devices"] == 8)
    step = saved["programs"][0]
    assert step["alias_bytes"] > 0 and step["peak_bytes"] > step["inputs"]["params"] > 0
    # FLOPs of the unpartitioned program over 8 devices, against the TPU compiler's per-device count
    tpu = plan(tiny("dpo_sentiment", "mesh.data=1", "mesh.fsdp=4"), "v5e:2x2").programs[0]
    assert 0.5 < step["flops"] * 8 / (tpu.flops * 4) < 2


def test_a_gpu_topology_without_the_cuda_plugin_is_a_config_error(capsys):
    assert cli.main(["plan", str(ROOT / "configs/sft_arithmetic.yaml"),
                     "--topology", "h100:8"]) == 2
    assert "pip install 'align_jax[cuda-plan]'" in capsys.readouterr().err
