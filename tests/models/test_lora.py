"""LoRA adapters and quantized bases against the plain decoder, PEFT and transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from align_jax.config import ConfigError, LoRAConfig
from align_jax.models import Decoder, load_pretrained, save_pretrained
from align_jax.models.lora import TRAINABLE, Linear
from align_jax.models.peft import merge_adapters, read_adapter, write_adapter
from align_jax.models.quant import quantize
from tests.models.test_hf_parity import hf_logits, left_padded_batch, tiny_hf_model

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def with_adapters(hf, lora: LoRAConfig, *, scan_layers=True, quant=None, seed=1):
    """Our model of `hf` with `lora`'s adapters, B random (not zero) so that they matter; the
    plain model of the same weights."""
    base = load_pretrained(hf, scan_layers=scan_layers)
    model = nnx.eval_shape(lambda: Decoder(base.config, rngs=nnx.Rngs(0), lora=lora, quant=quant,
                                           scan_layers=scan_layers))
    graphdef, adapters, rest = nnx.split(model, TRAINABLE, ...)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    base_params = nnx.to_pure_dict(nnx.state(base))
    if quant is not None:
        base_params = quantized_params(base_params, quant)
    nnx.replace_by_pure_dict(rest, base_params)
    return nnx.merge(graphdef, adapters, rest), base


def quantized_params(tree: dict, quant: str) -> dict:
    def visit(node):
        for name, child in node.items():
            if isinstance(child, dict) and "kernel" in child and name.endswith("_proj"):
                child["kernel"], child["kernel_scale"] = quantize(child["kernel"], quant)
            elif isinstance(child, dict):
                visit(child)
    visit(tree)
    return tree


@pytest.mark.parametrize("scan_layers", [True, False])
def test_new_adapters_leave_the_base_logits_unchanged(scan_layers):
    """B starts at zero: a fresh LoRA model's logits are the base's, bit for bit."""
    base = load_pretrained(tiny_hf_model("qwen2_qkv_bias"), scan_layers=scan_layers)
    model = Decoder(base.config, rngs=nnx.Rngs(3), lora=LoRAConfig(rank=4),
                    scan_layers=scan_layers)
    graphdef, adapters, _ = nnx.split(model, TRAINABLE, ...)
    assert all(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(adapters)
               if a.shape[-2] != 4)  # A is random
    lora = nnx.merge(graphdef, adapters, nnx.state(base))
    ids, mask = left_padded_batch(0)
    np.testing.assert_array_equal(np.asarray(lora(ids, mask)), np.asarray(base(ids, mask)))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_and_merged_export_matches(rslora, tmp_path):
    """PeftModel.from_pretrained on the transformers base gives our logits; `model/` (adapters
    merged) reloads in transformers with them too."""
    hf = tiny_hf_model("llama")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, rslora=rslora)
    model, _ = with_adapters(hf, lora)
    ids, mask = left_padded_batch(1)
    ours = np.asarray(model(ids, mask))
    write_adapter(model, lora, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    real = mask.astype(bool)  # transformers' logits at pad positions are not defined the same way
    np.testing.assert_allclose(hf_logits(theirs, ids, mask)[real], ours[real], atol=1e-4)
    save_pretrained(merge_adapters(model, lora), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids, mask)[real], ours[real], atol=1e-4)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_we_read_the_adapters_peft_writes(scan_layers, tmp_path):
    hf = tiny_hf_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                             init_lora_weights=False)  # random B: the adapter changes the model
    torch.manual_seed(1)
    peft.get_peft_model(hf, config).save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), str(tmp_path)).eval()
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model, base = with_adapters(tiny_hf_model("llama"), lora, scan_layers=scan_layers)
    graphdef, abstract, rest = nnx.split(model, nnx.LoRAParam, ...)
    model = nnx.merge(graphdef, read_adapter(tmp_path, abstract, lora), rest)
    ids, mask = left_padded_batch(2)
    real = mask.astype(bool)
    ours = np.asarray(model(ids, mask))[real]
    np.testing.assert_allclose(ours, hf_logits(theirs, ids, mask)[real], atol=1e-4)
    # the adapter was applied
    assert np.abs(ours - np.asarray(base(ids, mask))[real]).max() > 1e-2


def test_adapter_errors_name_the_file_and_key(tmp_path):
    hf = tiny_hf_model("llama")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model, _ = with_adapters(hf, lora)
    write_adapter(model, lora, tmp_path / "adapter")
    abstract = nnx.split(model, nnx.LoRAParam, ...)[1]
    with pytest.raises(ConfigError, match=r"adapter_config.json: r=4 but model.lora.rank=8"):
        read_adapter(tmp_path / "adapter", abstract, LoRAConfig(rank=8, alpha=8.0,
                                                                targets=TARGETS))
    with pytest.raises(ConfigError, match=r"target_modules=.*but model.lora.targets"):
        read_adapter(tmp_path / "adapter", abstract, LoRAConfig(rank=4, alpha=8.0))
    with pytest.raises(ConfigError, match=r"does not exist"):
        read_adapter(tmp_path / "nowhere", abstract, lora)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    written = json.loads(config_file.read_text())
    for key, value, message in [("use_dora", True, r"use_dora=True is not supported"),
                                ("init_lora_weights", "pissa_niter_4",
                                 r"init_lora_weights=.pissa_niter_4. changes the base"),
                                ("peft_type", "IA3", r"peft_type='IA3', expected 'LORA'")]:
        config_file.write_text(json.dumps({**written, key: value}))
        with pytest.raises(ConfigError, match=rf"adapter_config.json: {message}"):
            read_adapter(tmp_path / "adapter", abstract, lora)
    config_file.write_text(json.dumps(written))
    # an adapter of a wider base
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    other, _ = with_adapters(wide, lora)
    write_adapter(other, lora, tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors: tensor "
                                          r"'base_model.model.model.layers.0.self_attn.q_proj"
                                          r".lora_A.weight' has shape \(4, 128\), expected "
                                          r"\(4, 64\): the adapter is for another base"):
        read_adapter(tmp_path / "wide", abstract, lora)


@pytest.mark.parametrize("quant, bound", [("int8", 0.005), ("nf4", 0.12)])
def test_quantized_base_stays_near_the_float_base(quant, bound):
    """Logits of an int8 or NF4 base (with adapters) within `bound` of the float32 base's
    (measured: 0.0030 and 0.085)."""
    hf = tiny_hf_model("llama")
    lora = LoRAConfig(rank=4, targets=TARGETS)
    exact, _ = with_adapters(hf, lora)
    quantized, _ = with_adapters(hf, lora, quant=quant)
    ids, mask = left_padded_batch(3)
    diff = np.abs(np.asarray(quantized(ids, mask)) - np.asarray(exact(ids, mask)))
    assert 0 < diff.max() <= bound


def test_adapter_dropout_is_inverted_dropout_on_the_adapter_input():
    """y = x·W + s·((m ⊙ x) / (1 − p))·A·B with m ~ Bernoulli(1 − p); no key: no dropout."""
    lora = LoRAConfig(rank=3, alpha=6.0, dropout=0.5)
    with nnx.use_eager_sharding(False):
        layer = Linear(8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.float32,
                       param_dtype=jnp.float32, lora=lora)
    layer.lora_b[...] = jax.random.normal(jax.random.key(1), (3, 5))
    x = jax.random.normal(jax.random.key(2), (4, 8))
    key = jax.random.key(3)
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    w, a, b = (np.asarray(v[...]) for v in (layer.kernel, layer.lora_a, layer.lora_b))
    xn = np.asarray(x)
    np.testing.assert_allclose(np.asarray(layer(x, key)),
                               xn @ w + 2.0 * ((keep * xn / 0.5) @ a @ b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x)), xn @ w + 2.0 * (xn @ a @ b), rtol=1e-5,
                               atol=1e-6)


def test_reward_model_adapter_carries_its_head_both_ways(tmp_path):
    """A reward model's adapter holds its scalar head (`score.weight`, PEFT's modules_to_save):
    PEFT's sequence classifier with it scores as ours does, and reading it back restores both."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    base = load_pretrained(hf)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = nnx.eval_shape(lambda: Decoder(base.config, rngs=nnx.Rngs(0), lora=lora,
                                           with_scalar_head=True))
    graphdef, trained, rest = nnx.split(model, TRAINABLE, ...)
    keys = iter(jax.random.split(jax.random.key(4), 64))
    trained = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), trained)
    nnx.replace_by_pure_dict(rest, nnx.to_pure_dict(nnx.split(base, TRAINABLE, ...)[2]))
    model = nnx.merge(graphdef, trained, rest)
    write_adapter(model, lora, tmp_path)
    ids = np.array([[5, 17, 3, 99, 42, 8]])
    ours = np.asarray(model.score(ids, np.ones_like(ids)))
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(theirs(input_ids=torch.tensor(ids)).logits[:, 0].numpy(), ours,
                                   atol=1e-4)
    read = read_adapter(tmp_path, jax.tree.map(jnp.zeros_like, trained), lora)
    for x, y in zip(jax.tree.leaves(read), jax.tree.leaves(trained), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
