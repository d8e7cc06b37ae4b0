"""LoRA runs: what is trained, what the reference is, resume, export, sweeps over one base."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from align_jax.config import ConfigError
from align_jax.models.peft import write_adapter
from align_jax.plan import offline_specs
from align_jax.train import methods, train
from align_jax.train.host import build_model
from align_jax.train.mesh import make_mesh
from align_jax.train.models import add_reference, init_models
from align_jax.train.state import learning_rate, make_optimizer
from align_jax.train.step import make_train_step
from tests.train.test_memory_paths import TINY_MODEL
from tests.train.test_methods import pairs
from tests.train.test_run import config

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


def dpo_config(out, *extra):
    return config(out, *LORA, "train.eval_every=0", "data.eval_fraction=0", *extra,
                  base="configs/dpo_sentiment.yaml")


def test_lora_dpo_trains_adapters_only_against_the_base_as_reference(tmp_path):
    """The state holds adapters and their AdamW moments only; the reference is the frozen base
    (no copy), so the first step's loss is ln 2 and its rewards are β(log π − log π_base) with
    π_base the plain model of the same weights; the base never changes."""
    cfg = dpo_config(tmp_path, "loss.beta=0.5")
    mesh, tx = make_mesh(), make_optimizer(cfg.train)
    make_model, make_base, pretrained = build_model(cfg, mesh)
    models, state, _, frozen, frozen_shardings = init_models(cfg, mesh, tx, make_model, make_base,
                                                             pretrained)
    models, frozen, _ = add_reference(cfg, mesh, models, state, frozen, frozen_shardings)
    assert frozen.reference is None and models.base_is_reference
    trained = {path[-1] for path, _ in nnx.to_flat_state(state.params)}
    assert trained == {"lora_a", "lora_b"}
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(state.params))
    moments = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(adapter_sizes * 2)  # AdamW's μ and ν of the adapters, nothing else
    base_before = jax.tree.map(np.asarray, frozen.base)
    # the base is the model's own initial weights, as a plain decoder initialises them
    plain_graphdef = nnx.split(nnx.eval_shape(lambda: make_base(nnx.Rngs(0))))[0]
    plain_params = jax.jit(lambda: nnx.split(make_base(nnx.Rngs(cfg.train.seed)))[1])()
    assert_trees_equal(plain_params, frozen.base)
    plain = nnx.merge(plain_graphdef, plain_params)

    step = jax.jit(make_train_step(methods.dpo, models, tx, cfg.loss, 1, learning_rate(cfg.train)))
    batch = jax.tree.map(jnp.asarray, pairs(3, B=8, vocab=384, share_prompt=True))
    for i in range(3):
        policy = models.model(state.params, frozen)
        expected = methods.pair_logps(policy, batch).chosen_B - methods.pair_logps(
            plain, batch).chosen_B
        state, metrics = step(state, frozen, batch)
        np.testing.assert_allclose(float(metrics["rewards/chosen"]),
                                   float(0.5 * jnp.mean(expected)), rtol=1e-4, atol=1e-6)
        if i == 0:
            np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-6)
    assert np.any(np.asarray(state.params["layers"]["mlp"]["down_proj"]["lora_b"][...]) != 0)
    assert_trees_equal(base_before, frozen.base)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_qlora_run_resumes_bitwise_and_exports_adapter_and_merged_model(tmp_path):
    """An NF4 base with adapter dropout: 1 step, a stop, 2 more equal 3 straight, bit for bit,
    in the PEFT adapter and the merged model."""
    extra = ["train.steps=3", "model.lora.base_dtype=nf4", "model.lora.dropout=0.1"]
    train(dpo_config(tmp_path / "straight", *extra), progress=False)
    train(dpo_config(tmp_path / "resumed", *extra), progress=False, max_updates=1)
    train(dpo_config(tmp_path / "resumed", *extra), progress=False, resume=True)
    for file in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = (load_file(str(tmp_path / run / file)) for run in ("straight", "resumed"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{file}: {name}")
    adapter = json.loads((tmp_path / "straight/adapter/adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["peft_type"]) == (4, 8.0, "LORA")
    # a run continued from that adapter (model.lora.init_from) starts from its weights
    cfg = dpo_config(tmp_path / "continued", *extra,
                     f"model.lora.init_from={tmp_path / 'straight/adapter'}")
    mesh, tx = make_mesh(), make_optimizer(cfg.train)
    models, state, _, frozen, _ = init_models(cfg, mesh, tx, *build_model(cfg, mesh))
    write_adapter(models.model(state.params, frozen), cfg.model.lora, tmp_path / "again")
    a, b = (load_file(str(d / "adapter_model.safetensors"))
            for d in (tmp_path / "straight/adapter", tmp_path / "again"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_lora_sweep_members_share_one_base(tmp_path):
    """K members of a LoRA sweep take one base plus K adapters (and their AdamW moments) in the
    compiled step's arguments."""
    def argument_bytes(values):
        cfg = dpo_config(tmp_path, "model.lora.rank=2", "sweep.field=beta",
                         f"sweep.values=[{','.join(map(str, values))}]")
        spec = offline_specs(cfg, make_mesh())[0]
        state, frozen, batch = spec.args
        compiled = spec.fn.lower(*spec.args).compile().memory_analysis()
        return (compiled.argument_size_in_bytes, nbytes(state) // len(values), nbytes(frozen),
                nbytes(batch))

    for k in (1, 4):
        arguments, member, base, batch = argument_bytes([0.1 * (i + 1) for i in range(k)])
        assert arguments == base + k * member + batch, k
    assert base > 5 * member


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_grpo_run_samples_from_base_and_adapters(tmp_path):
    """GRPO with β > 0 on an int8 base: the reference log-probs come from the base with the
    adapters off, which is the policy before the first update (KL 0) and not after it, and the
    policy's adapters are exported. One update per rollout, on a reward that varies within every
    group of the random model's samples, so the first update moves the adapters."""
    cfg = config(tmp_path, *TINY_MODEL, *LORA, "model.lora.base_dtype=int8", "rl.beta=0.04",
                 "rl.num_generations=4", "rl.max_new_tokens=8", "train.steps=2", "train.lr=0.01",
                 "rl.mini_batches=1", "rl.reward_funcs=[tests.train:token_reward]",
                 "rl.reward_weights=null", base="configs/grpo_arithmetic.yaml")
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] < 1e-6 < rows[1]["kl"]
    assert rows[0]["sampling/sampler_trainer_logp_diff"] < 1e-4
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()
    assert (tmp_path / "model/model.safetensors").exists()


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=0", r"model.lora.rank=0: the adapters' rank must be positive"),
    ("model.lora.targets=[q_proj,qkv]", r"model.lora.targets: \['qkv'\] match no module"),
    ("model.lora.base_dtype=int4", r"model.lora.base_dtype='int4': expected one of"),
    ("model.lora.init_from=/nowhere", r"model.lora.init_from: /nowhere/adapter_config.json does "
                                      r"not exist"),
])
def test_bad_lora_settings_are_one_clear_error(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(dpo_config(tmp_path, "train.steps=1", override), progress=False)



MIXTRAL = ["model.path=null", "model.init.model_type=mixtral", "model.init.vocab_size=384",
           "model.init.hidden_size=32", "model.init.intermediate_size=32",
           "model.init.num_hidden_layers=1", "model.init.num_attention_heads=4",
           "model.init.num_key_value_heads=2", "model.init.num_local_experts=2",
           "model.init.num_experts_per_tok=1"]


ATTENTION = "model.lora.targets=[q_proj,v_proj]"


@pytest.mark.parametrize("overrides, message", [
    ([], r"model.lora.targets: \['gate_proj', 'up_proj', 'down_proj'\] are the experts of a "
         r"mixture-of-experts model \(mixtral\)"),
    ([ATTENTION], None),
    ([ATTENTION, "model.lora.base_dtype=nf4"], r"a quantized base of a mixture-of-experts model"),
])
def test_lora_on_a_mixture_of_experts_adapts_its_attention(overrides, message, tmp_path):
    cfg = dpo_config(tmp_path, *MIXTRAL, *overrides, "train.steps=1")
    if message is None:
        train(cfg, progress=False)
        assert (tmp_path / "adapter/adapter_config.json").exists()
        return
    with pytest.raises(ConfigError, match=message):
        train(cfg, progress=False)
