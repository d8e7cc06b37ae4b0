"""An SFT, DPO, QLoRA DPO or GRPO step on data-parallel, FSDP, tensor-parallel and combined meshes
of 8 CPU devices gives the one-device loss, gradient norm and updated parameters, and the sampler
on those sharded parameters (with and without adapters, and a second turn decoded from the
cache) the one-device tokens and log-probs, and each non-Llama family's forward and backward pass
the one-device logits and gradient norm (the mixture-of-experts families with their experts split
over an expert axis; JAX's own SPMD runtime, in a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train import eight_cpu_devices

ROOT = Path(__file__).parents[2]
# one worker computes the report (`-n 2 --dist loadgroup`)
pytestmark = pytest.mark.xdist_group("sharding")


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "-m", "tests.train.sharded_steps"], cwd=ROOT,
                         env=eight_cpu_devices(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


MESHES = ["data", "fsdp", "tensor", "data_x_fsdp_x_tensor"]
LORA_MESHES = ["fsdp", "data_x_fsdp_x_tensor"]  # as in sharded_steps.py
CASES = [(mesh, method) for mesh in MESHES for method in ("sft", "dpo", "grpo")]
CASES += [(mesh, "dpo_lora") for mesh in LORA_MESHES]


@pytest.mark.parametrize("mesh, method", CASES)
def test_sharded_step_equals_one_device(report, mesh, method):
    one, many = report[f"one_device/{method}"], report[f"{mesh}/{method}"]
    np.testing.assert_allclose(many["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(many["grad_norm"], one["grad_norm"], rtol=1e-5)
    for a, b in zip(many["params"], one["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


SHARDS = {"one_device": [1, 64, 128], "data": [1, 64, 128], "fsdp": [1, 8, 128],
          "tensor": [1, 64, 16], "data_x_fsdp_x_tensor": [1, 32, 64]}


@pytest.mark.parametrize("method, meshes", [("sft", list(SHARDS)),
                                            ("dpo_lora", ["one_device", *LORA_MESHES])])
def test_parameters_are_really_sharded(report, method, meshes):
    # layers.mlp.up_proj.kernel is [1 (layers), 64 (embed → fsdp), 128 (mlp → tensor)], trained
    # (sft) or the int8 codes of a frozen LoRA base
    assert {m: report[f"{m}/{method}"]["kernel_shard"] for m in meshes} == {m: SHARDS[m]
                                                                            for m in meshes}
    assert report[f"one_device/{method}"]["devices"] == 1
    assert report[f"fsdp/{method}"]["devices"] == 8


@pytest.mark.parametrize("mesh, sample", [(m, s) for m in MESHES
                                          for s in ("sample", "sample_turns")]
                         + [(m, "sample_lora") for m in LORA_MESHES])
def test_sampling_from_sharded_parameters_equals_one_device(report, mesh, sample):
    one, many = report[f"one_device/{sample}"], report[f"{mesh}/{sample}"]
    assert many["ids"] == one["ids"]  # same key, same tokens
    np.testing.assert_allclose(many["logps"], one["logps"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, mesh", [("gemma2", "data_x_fsdp_x_tensor"),
                                          ("gemma3_text", "data_x_fsdp_x_tensor"),
                                          ("mixtral", "expert_x_fsdp_x_tensor"),
                                          ("qwen3_moe", "expert_x_fsdp_x_tensor")])
def test_sharded_forward_of_each_family_equals_one_device(report, family, mesh):
    one, many = report[f"one_device/{family}"], report[f"{mesh}/{family}"]
    np.testing.assert_allclose(many["logits"], one["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(many["grad_norm"], one["grad_norm"], rtol=1e-5)
    assert many.get("ids") == one.get("ids")  # the MoE families' samplers
    if "expert_shard" in one:  # [layers, experts, embed, expert width] over expert, fsdp, tensor
        L, E, D, I = one["expert_shard"]  # noqa: E741
        assert many["expert_shard"] == [L, E // 2, D // 2, I // 2]
