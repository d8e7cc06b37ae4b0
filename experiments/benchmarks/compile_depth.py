"""Compile time against depth: the SmolLM2-135M architecture's training step (loss, gradients,
AdamW update) with 2 and with 32 layers, compiled for this host's CPU and, ahead of time, for a
TPU v5e 2x2 slice (fsdp over its 4 chips). The blocks are one `lax.scan`, so the program is one
block's whatever the depth and compile time should barely grow; the last column compiles the
32 layers as separate blocks (`scan_layers=False`) for comparison.

Run: python -m experiments.benchmarks.compile_depth [--layers 2 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
import transformers
from flax import nnx

from align_jax.models import Decoder, config_from_hf
from align_jax.topology import target
from align_jax.train.mesh import activation_sharding, batch_sharding, make_mesh, param_shardings
from experiments.benchmarks.smollm2 import SMOLLM2_135M

ROWS, TOKENS = 8, 512


def compile_seconds(num_layers: int, devices, scan_layers: bool = True) -> float:
    """Seconds to lower and compile one AdamW step of a `num_layers`-layer model on `devices`."""
    hf = transformers.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": num_layers})
    mesh = make_mesh(data=1, fsdp=-1, devices=devices)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(
        config_from_hf(hf), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat="full",
        activation_sharding=activation_sharding(mesh), scan_layers=scan_layers)))
    shardings = param_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, shardings)
    tx = optax.adamw(1e-5)
    opt = jax.eval_shape(tx.init, params)
    ids = jax.ShapeDtypeStruct((ROWS, TOKENS), jnp.int32, sharding=batch_sharding(mesh))

    def step(params, opt, ids):
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids[:, :-1]).astype(jnp.float32)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None],
                                                 axis=-1))
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    start = time.perf_counter()
    jax.jit(step).lower(params, opt, ids).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 32), metavar=("SHALLOW", "DEEP"),
                        help="the two depths to compile")
    shallow_layers, deep_layers = parser.parse_args(argv).layers
    print(f"SmolLM2-135M widths, {ROWS} × {TOKENS} tokens, bf16, remat full, AdamW")
    print(f"| target | {shallow_layers} layers, s | {deep_layers} layers, s | ratio "
          f"| {deep_layers} separate layers, s |\n|---|---|---|---|---|")
    targets = (("this CPU", jax.devices()[:1]), ("TPU v5e:2x2", target("v5e:2x2").devices))
    for name, devices in targets:
        compile_seconds(shallow_layers, devices)  # warm-up: a backend's first compile pays setup
        shallow = compile_seconds(shallow_layers, devices)
        deep = compile_seconds(deep_layers, devices)
        separate = compile_seconds(deep_layers, devices, scan_layers=False)
        print(f"| {name} | {shallow:.1f} | {deep:.1f} | {deep / shallow:.2f} | {separate:.1f} |",
              flush=True)

if __name__ == "__main__":
    main()
