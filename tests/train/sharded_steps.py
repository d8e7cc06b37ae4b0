"""Run by test_sharding.py in a fresh process with 8 host devices: SFT, DPO (on packed pairs),
QLoRA DPO (adapters on an int8 base that is also the reference) and GRPO updates on several meshes,
sampling from the updated sharded parameters (with and without adapters), and each non-Llama
family's forward and backward pass on packed pairs (the mixture-of-experts families on a mesh with
an expert axis, and their sampler too), compared with one device. Prints a JSON report."""

import dataclasses
import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), \
    "set XLA_FLAGS first"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from align_jax import sampling  # noqa: E402
from align_jax.config import LoRAConfig, LossConfig, RLConfig  # noqa: E402
from align_jax.data import SequenceBatch, collate  # noqa: E402
from align_jax.models import Decoder, config_from_hf  # noqa: E402
from align_jax.models.registry import config_from_init  # noqa: E402
from align_jax.sampling import SamplingConfig, generate  # noqa: E402
from align_jax.train import methods, online  # noqa: E402
from align_jax.train.mesh import (  # noqa: E402
    activation_sharding,
    make_mesh,
    param_shardings,
    shard_batch,
)
from align_jax.train.models import Frozen, Models, init_lora  # noqa: E402
from align_jax.train.state import init_train_state  # noqa: E402
from align_jax.train.step import jit_train_step, make_train_step  # noqa: E402

LORA = LoRAConfig(rank=4, alpha=8.0)
LORA_MESHES = ("one_device", "fsdp", "data_x_fsdp_x_tensor")  # the last splits every axis
MESHES = {"one_device": None, "data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8),
          "data_x_fsdp_x_tensor": (2, 2, 2)}
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
             sliding_window=4)
FAMILIES = {"gemma2": dict(attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
            "gemma3_text": dict(rope_local_base_freq=100.0),
            "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
            "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)}
MOE_MESH = dict(data=1, fsdp=2, expert=2, tensor=2)  # experts split 2 ways, their width 2 ways


def sequences(seed, B=8, L=16, vocab=128):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(B, L)).astype(np.int32)
    lengths = rng.integers(6, L + 1, size=B)
    attention = np.arange(L)[None] < lengths[:, None]
    completion = attention & (np.arange(L)[None] >= 3)
    return SequenceBatch(np.where(attention, ids, 0), attention, completion)


def packed_pairs(seed, B=8, vocab=128):
    """Preference pairs packed one per row (prompt | chosen | rejected), DPO's default layout."""
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(1, vocab, n).tolist()  # noqa: E731
    examples = [{"prompt_ids": tokens(rng.integers(0, 6)), "chosen_ids": tokens(rng.integers(1, 9)),
                 "rejected_ids": tokens(rng.integers(1, 9))} for _ in range(B)]
    return collate(examples, "preference", (8, 16), pad_id=0, share_prompt=True)


def two_turns(model, prompts) -> dict:
    """A second turn decoded from the cache after each row is extended by a different number of
    tokens (one row not resumed): both turns' tokens and log-probs."""
    config = SamplingConfig(max_new_tokens=5, num_samples=2, stop_token_ids=(7, 9, 11, 13))
    d = sampling.prefill(model, jnp.asarray(prompts.ids_BxT[:3, :6]),
                         jnp.asarray(prompts.attention_mask_BxT[:3, :6]), num_samples=2, slots=24)
    first, d = sampling.decode(model, d, jax.random.key(0), config)
    block = np.array([[0, 0, 5], [0, 3, 4], [0, 0, 0], [1, 2, 3], [0, 0, 8], [0, 6, 6]])
    d = sampling.extend(model, d, jnp.asarray(block), jnp.asarray(block > 0),
                        jnp.asarray([True, True, False, True, True, True]))
    second, _ = sampling.decode(model, d, jax.random.key(1), config)
    return {"ids": np.concatenate([first.ids_BxC, second.ids_BxC], 1).tolist(),
            "logps": np.concatenate([first.logps_BxC, second.logps_BxC], 1).tolist()}


def main():
    config = config_from_hf(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64))
    make_model = lambda rngs: Decoder(config, rngs=rngs)  # noqa: E731
    pretrained = nnx.split(make_model(nnx.Rngs(1)))[1]
    tx = optax.sgd(0.5, momentum=0.9)
    rollout = sequences(4)
    rng = np.random.default_rng(5)
    old_logps = -rng.uniform(3, 6, size=(8, 10)).astype(np.float32)
    batches = {"sft": sequences(0), "dpo": packed_pairs(1),
               "grpo": online.Rollout(rollout.ids_BxT[:, :6], rollout.attention_mask_BxT[:, :6],
                                      rollout.ids_BxT[:, 6:], rollout.attention_mask_BxT[:, 6:],
                                      rollout.attention_mask_BxT[:, 6:], old_logps,
                                      rng.normal(size=8).astype(np.float32), old_logps + 0.1)}
    losses = {"sft": (methods.sft, LossConfig()), "dpo": (methods.dpo, LossConfig(beta=0.5)),
              "grpo": (online.grpo, RLConfig(beta=0.04, entropy_coef=0.01, max_new_tokens=10))}
    losses["dpo_lora"], batches["dpo_lora"] = losses["dpo"], batches["dpo"]
    report = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(*shape) if shape else make_mesh(devices=jax.devices()[:1])
        for method, batch in batches.items():
            if method == "dpo_lora" and name not in LORA_MESHES:
                continue
            if method == "dpo_lora":  # int8 base, adapters, the base as reference
                models, state, shardings, frozen, frozen_shardings = init_lora(
                    lambda r: Decoder(config, rngs=r, lora=LORA, quant="int8"),
                    lambda r: Decoder(config, rngs=r, quant="int8"), tx, mesh, 0, pretrained, None,
                    "int8", np.float32)
                models = dataclasses.replace(models, base_is_reference=True)
            else:
                graphdef, state, shardings = init_train_state(make_model, tx, mesh, 0, pretrained)
                models, frozen, frozen_shardings = Models(graphdef), Frozen(), Frozen()
            if method == "dpo":
                frozen_shardings = Frozen(reference=param_shardings(state.params, mesh))
                frozen = Frozen(reference=jax.device_put(
                    jax.tree.map(lambda x: x * 1.01, pretrained), frozen_shardings.reference))
            loss_fn, cfg = losses[method]
            step = jit_train_step(make_train_step(loss_fn, models, tx, cfg, 2,
                                                  optax.constant_schedule(0.5)),
                                  shardings, frozen_shardings, mesh)
            for _ in range(2):
                state, metrics = step(state, frozen, shard_batch(batch, mesh))
            if method in ("sft", "dpo_lora"):  # the sampler on the same sharded parameters
                prompts = sequences(3)
                out = generate(models.model(state.params, frozen), prompts.ids_BxT[:, :6],
                               prompts.attention_mask_BxT[:, :6], jax.random.key(0),
                               SamplingConfig(max_new_tokens=5, num_samples=2))
                report[f"{name}/sample{'_lora' if method == 'dpo_lora' else ''}"] = {
                    "ids": np.asarray(out.ids_BxC).tolist(),
                    "logps": np.asarray(out.logps_BxC).tolist()}
            if method == "sft":
                report[f"{name}/sample_turns"] = two_turns(models.model(state.params, frozen),
                                                           sequences(3))
            kernel = (frozen.base if method == "dpo_lora" else state.params)[
                "layers"]["mlp"]["up_proj"]["kernel"][...]
            report[f"{name}/{method}"] = {
                "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "params": [np.asarray(x).ravel()[:64].tolist()
                           for x in jax.tree.leaves(state.params)],
                "kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
                "devices": len(kernel.sharding.device_set)}
    report.update(family_forwards())
    json.dump(report, sys.stdout)


def family_forwards() -> dict:
    """Logits and the gradient norm of Σ logits² of each family's model on packed pairs (segment
    ids, sliding windows), on one device and on the data × fsdp × tensor mesh (the MoE families on
    fsdp × expert × tensor, and their samplers)."""
    batch = packed_pairs(2)
    report = {}
    for family, features in FAMILIES.items():
        config = config_from_init({"model_type": family, **SIZES, **features})
        moe = config.num_experts > 0
        for name in ("one_device", "expert_x_fsdp_x_tensor" if moe else "data_x_fsdp_x_tensor"):
            mesh = (make_mesh(devices=jax.devices()[:1]) if name == "one_device"
                    else make_mesh(**MOE_MESH) if moe else make_mesh(*MESHES[name]))
            make_model = lambda rngs: Decoder(  # noqa: E731
                config, rngs=rngs, activation_sharding=activation_sharding(mesh))
            graphdef, state, _ = init_train_state(make_model, optax.sgd(0.1), mesh, 0)

            def logits(params, b):
                return nnx.merge(graphdef, params)(b.ids_BxT, b.attention_mask_BxT,
                                                   segment_ids_BxT=b.segment_ids_BxT)
            placed = shard_batch(batch, mesh)
            out = jax.jit(logits)(state.params, placed)
            grads = jax.jit(jax.grad(lambda p, b: jnp.sum(logits(p, b) ** 2)))(state.params, placed)
            report[f"{name}/{family}"] = {"logits": np.asarray(out[..., :8]).tolist(),
                                          "grad_norm": float(optax.tree.norm(grads))}
            if moe:  # the experts' shards; 3 prompts × 2 samples: rows that do not split
                gate = state.params["layers"]["mlp"]["gate_proj"][...]
                report[f"{name}/{family}"]["expert_shard"] = list(
                    gate.sharding.shard_shape(gate.shape))
                prompts = sequences(3)
                sample = generate(nnx.merge(graphdef, state.params), prompts.ids_BxT[:3, :6],
                                  prompts.attention_mask_BxT[:3, :6], jax.random.key(0),
                                  SamplingConfig(max_new_tokens=5, num_samples=2))
                report[f"{name}/{family}"]["ids"] = np.asarray(sample.ids_BxC).tolist()
    return report


if __name__ == "__main__":
    main()
