"""Run by test_multiprocess.py: process PROCESS_ID of 2 on localhost, each with 2 CPU devices,
joined by `jax.distributed.initialize` (gloo collectives), trains a few DPO steps on a 4-device
mesh."""

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[1]}", num_processes=2,
                           process_id=int(sys.argv[2]))

from align_jax.train import train  # noqa: E402
from tests.train.test_run import config  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
train(config(sys.argv[3], *sys.argv[4:], base="configs/dpo_sentiment.yaml"), progress=False)
print(f"process {jax.process_index()} done", file=sys.stderr)
os._exit(0)
