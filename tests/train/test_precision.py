"""Mixed precision: `model.dtype=bfloat16` computes in bfloat16 on float32 master weights and
optimizer state, with the frozen reference held in bfloat16; its loss curve tracks float32's.
`train.mu_dtype=bfloat16` adds AdamW's first moment in bfloat16."""

import numpy as np
import pytest

from tests.train.test_memory_paths import losses

# 20 steps at a learning rate that moves the tiny model: SFT's loss falls by about 2.6 nats.
MOVING = ["train.steps=20", "train.lr=3e-3", "train.schedule=constant", "train.warmup_steps=0"]
BF16 = ["model.dtype=bfloat16"]
# Largest |bf16 − float32| over the 20 steps' losses: 0.012 (SFT) and 0.0015 (DPO) were measured.
CASES = {"sft_bf16_mu": ("sft", BF16 + ["train.mu_dtype=bfloat16"], 0.03),
         "dpo_bf16": ("dpo", BF16, 0.005)}
# one worker runs them all, so each method's float32 run is made once (`--dist loadgroup`)
pytestmark = pytest.mark.xdist_group("precision")


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory):
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = np.array(losses(tmp_path_factory.mktemp(method), method, *MOVING))
        return runs[method]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_tracks_the_float32_loss_curve(case, float32_losses, tmp_path):
    method, overrides, bound = CASES[case]
    f32 = float32_losses(method)
    bf16 = np.array(losses(tmp_path, method, *MOVING, *overrides))
    assert f32[0] - f32.min() > (2.0 if method == "sft" else 0.1)  # the curve moves
    gap = np.max(np.abs(bf16 - f32))
    assert 0 < gap < bound, (gap, f32, bf16)  # a different computation, the same curve
