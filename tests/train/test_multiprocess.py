"""Two processes × 2 CPU devices, joined with `jax.distributed` over localhost, train DPO steps
that match one process on one device: the code path of GPU clusters and TPU pods."""

import os
import socket
import subprocess
import sys

import numpy as np

from align_jax.train import train
from tests.train.test_run import ROOT, config, weights

DPO = ["train.steps=3", "data.synthetic_args.n=64", "data.eval_fraction=0.25", "train.batch_size=8",
       "train.micro_batches=2", "loss.precompute_ref_logps=true"]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port, out = str(free_port()), str(tmp_path / "two")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.two_processes", port, str(i), out,
                               *DPO], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    assert all("done" in err for err in errors)
    train(config(tmp_path / "one", *DPO, base="configs/dpo_sentiment.yaml"), progress=False)
    a, b = weights(out), weights(tmp_path / "one")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
