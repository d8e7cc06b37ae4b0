"""The sampler on devices of its own: on 8 CPU devices with `rl.sampler_devices=4`, the train
state lives on the first four and the sampler's copy of the parameters on the last four; a GRPO
run so split samples the same tokens and trains the same weights as one on a shared 8-device mesh,
and with `rl.async_rollouts` samples its second rollout one update behind (JAX's own SPMD runtime,
in a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train import eight_cpu_devices

ROOT = Path(__file__).parents[2]
# one worker computes the report (`-n 2 --dist loadgroup`)
pytestmark = pytest.mark.xdist_group("sampler_devices")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = subprocess.run([sys.executable, "-m", "tests.train.sampler_devices",
                          str(tmp_path_factory.mktemp("sampler"))], cwd=ROOT,
                         env=eight_cpu_devices(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_trainer_and_sampler_hold_their_own_devices(report):
    assert report["trainer_devices"] == [0, 1, 2, 3]
    assert report["sampler_devices"] == [4, 5, 6, 7]


def test_a_sampler_apart_equals_a_shared_mesh(report):
    shared, apart = report["shared"], report["apart"]
    assert apart["metrics"]["reward"] == shared["metrics"]["reward"]  # the same tokens
    for name in ("loss", "grad_norm", "sampling/sampler_trainer_logp_diff"):
        np.testing.assert_allclose(apart["metrics"][name], shared["metrics"][name], rtol=1e-4,
                                   atol=1e-7, err_msg=name)
    for name, value in shared["weights"].items():
        np.testing.assert_allclose(apart["weights"][name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_async_rollouts_on_a_sampler_apart_sample_one_update_behind(report):
    gap = "sampling/sampler_trainer_logp_diff"
    assert report["apart"]["metrics"][gap] < 1e-6 < 1e-3 < report["apart_async"]["metrics"][gap]
