import os

import numpy as np


def eight_cpu_devices() -> dict[str, str]:
    """The environment of a subprocess on 8 CPU devices (JAX's own SPMD runtime). Its programs run
    on tiny shapes once or twice, so compiling is the cost: XLA's CPU backend skips its expensive
    LLVM passes (a third of the time; a long training run would be slower)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"))


def token_reward(completion_ids, **_) -> list[float]:
    """A reward a tiny random model's samples vary in (`rl.reward_funcs=[tests.train:token_reward]`,
    so every group has an advantage): their mean token id."""
    return [float(np.mean(ids)) / 384 for ids in completion_ids]
