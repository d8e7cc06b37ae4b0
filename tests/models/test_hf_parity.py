"""align_jax's decoder against transformers (PyTorch) on tiny random models of each family."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from align_jax.models import (
    config_from_hf,
    init_cache,
    load_pretrained,
    save_pretrained,
)
from align_jax.models.decoder import REMAT_POLICIES
from align_jax.models.hf import to_tensors

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "smollm_tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral_sliding_window": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2_qkv_bias": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3_qk_norm": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
    # caps small enough to bend these scores and logits (without them |Δlogit| > 1e-3), a window
    # of 5 on the first of the two layers, and a query scale that is not 1/√head_dim
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=0.1, final_logit_softcapping=0.5),
    # a global layer between two windowed ones, each kind with its own RoPE (scaled 10⁶, 100)
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=24, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=100.0),
    # 4 experts, 2 per token; Qwen3-MoE without renormalising the top-2 weights
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
        norm_topk_prob=False),
}
MOE = ("mixtral", "qwen3_moe")


def tiny_hf_model(name):
    torch.manual_seed(0)
    config = ARCHITECTURES[name]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise them so they are tested
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if pname.endswith("mlp.gate.weight"):  # a router with clear preferences: no
                p.mul_(20)  # near-ties that rounding could resolve either way
    return model


def left_padded_batch(seed, B=3, T=12, vocab=101):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids)),
                     attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers_on_left_padded_batch(name, tmp_path):
    hf = tiny_hf_model(name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_pretrained(tmp_path)
    ids, mask = left_padded_batch(1)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    expected = hf_logits(hf, ids, mask)
    diff = np.abs(got - expected)[mask.astype(bool)].max()
    assert diff < 1e-4, f"{name}: max |Δlogit| = {diff:.2e}"


@pytest.mark.parametrize("name", ["llama", "mistral_sliding_window", "qwen3_qk_norm", "gemma2",
                                  "gemma3_text", *MOE])
def test_packed_prompt_chosen_rejected_rows_match_separate_rows(name):
    """Segment ids pack prompt | chosen | rejected | pad into one row; each completion's logits
    equal transformers' on prompt + that completion as a row of its own (the window of 5 < 12 prompt
    tokens checks that the sliding window counts positions, not slots)."""
    hf = tiny_hf_model(name)
    model = load_pretrained(hf)
    rng = np.random.default_rng(3)
    prompt, chosen, rejected = (rng.integers(1, 101, n) for n in (12, 6, 9))
    ids = np.concatenate([prompt, chosen, rejected, [0, 0]])[None]
    segments = np.array([[0] * 12 + [1] * 6 + [2] * 9 + [0, 0]])
    mask = np.arange(ids.shape[1])[None] < 27
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask),
                           segment_ids_BxT=jnp.asarray(segments)))
    for completion, slots in ((chosen, np.arange(12, 18)), (rejected, np.arange(18, 27))):
        row = np.concatenate([prompt, completion])[None]
        expected = hf_logits(hf, row, np.ones_like(row))
        np.testing.assert_allclose(got[0, :12], expected[0, :12], atol=1e-4)
        np.testing.assert_allclose(got[0, slots], expected[0, 12:], atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral_sliding_window", "qwen3_qk_norm", "gemma2",
                                  "gemma3_text", *MOE])
def test_kv_cache_decoding_matches_full_forward_step_by_step(name):
    hf = tiny_hf_model(name)
    model = load_pretrained(hf)
    ids, mask = left_padded_batch(2, T=14)
    prompt_len, steps = 8, ids.shape[1] - 8
    cache = init_cache(model.config, ids.shape[0], ids.shape[1])
    logits, cache = model(jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len]),
                          cache)
    full = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid[:, :prompt_len]],
                               full[:, :prompt_len][valid[:, :prompt_len]], atol=1e-4)
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        rows = valid[:, t]
        np.testing.assert_allclose(np.asarray(logits)[rows, 0], full[rows, t], atol=1e-4,
                                   err_msg=f"{name}: decode step {t}")
    assert int(cache.index) == ids.shape[1]


@pytest.mark.parametrize("name", ["llama", "smollm_tied", "qwen2_qkv_bias", "qwen3_qk_norm",
                                  "gemma2", "gemma3_text", *MOE])
def test_save_then_reload_in_transformers_gives_the_same_logits(name, tmp_path):
    hf = tiny_hf_model(name)
    model = load_pretrained(hf)
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation=hf.config._attn_implementation).eval()
    ids, mask = left_padded_batch(3)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask)[mask.astype(bool)],
                               hf_logits(hf, ids, mask)[mask.astype(bool)], atol=1e-5)
    again = load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))))


def test_sharded_safetensors_with_index_load(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask = left_padded_batch(4)
    got = np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask.astype(bool)], hf_logits(hf, ids, mask)[mask.astype(bool)],
                               atol=1e-4)


def test_bfloat16_compute_stays_close_and_saves_as_bfloat16(tmp_path):
    hf = tiny_hf_model("llama")
    model = load_pretrained(hf, dtype=jnp.bfloat16)
    ids, mask = left_padded_batch(5)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
    assert model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    np.testing.assert_allclose(got[mask.astype(bool)], hf_logits(hf, ids, mask)[mask.astype(bool)],
                               atol=0.05)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16


def test_scalar_head_scores_the_last_non_pad_token():
    from flax import nnx

    from align_jax.models import Decoder

    config = config_from_hf(ARCHITECTURES["llama"]())
    model = Decoder(config, rngs=nnx.Rngs(0), with_scalar_head=True)
    ids, mask = left_padded_batch(6)
    right = np.ones_like(mask)
    right[0, 7:] = 0
    values = np.asarray(model.token_values(jnp.asarray(ids), jnp.asarray(right)))
    scores = np.asarray(model.score(jnp.asarray(ids), jnp.asarray(right)))
    np.testing.assert_allclose(scores, [values[0, 6], values[1, -1], values[2, -1]], rtol=1e-6)


def test_remat_policies_give_identical_logits_and_gradients():
    hf = tiny_hf_model("qwen2_qkv_bias")
    ids, mask = (jnp.asarray(a) for a in left_padded_batch(7))
    model = load_pretrained(hf)
    graphdef, params = nnx.split(model)

    def logits_and_grads(params):
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) ** 2)  # noqa: E731
        return nnx.merge(graphdef, params)(ids, mask), jax.grad(loss)(params)

    plain = logits_and_grads(params)
    for remat in [p for p in REMAT_POLICIES if p != "none"]:
        model.remat = remat
        graphdef, params = nnx.split(model)
        chex.assert_trees_all_close(logits_and_grads(params), plain, atol=1e-5, rtol=1e-5)


def test_parameters_carry_logical_axis_names():
    from align_jax.models import Decoder

    model = Decoder(config_from_hf(ARCHITECTURES["qwen3_qk_norm"]()), rngs=nnx.Rngs(0))
    names = {".".join(map(str, path)): getattr(v, "out_sharding", None)
             for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    assert names["embed_tokens.embedding"] == ("vocab", "embed")
    assert names["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert names["layers.self_attn.k_proj.kernel"] == ("layers", "embed", "kv_heads")
    assert names["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert names["layers.self_attn.q_norm.weight"] == ("layers", "head_dim")
    assert all(v is not None for v in names.values())


# Llama-style blocks with biases; Gemma's sandwich norms, q/k norms and mixed layer kinds; experts
GRADIENT_CHECKS = ("qwen2_qkv_bias", "gemma3_text", "qwen3_moe")


def test_separate_blocks_equal_the_scanned_stack(tmp_path):
    """`scan_layers=False` (L Blocks in a Python loop instead of one scan over stacked parameters),
    on every architecture: logits equal transformers', KV-cache decoding equals the full forward,
    and the saved checkpoint holds the same tensors; gradients (with remat) equal the scanned
    model's tensor for tensor on one architecture of each block kind (`GRADIENT_CHECKS`)."""
    ids, mask = (jnp.asarray(a) for a in left_padded_batch(1))
    forward = nnx.jit(lambda model, *inputs: model(*inputs))  # eager, each op would compile alone

    def hf_named_grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) ** 2)  # noqa: E731
        return to_tensors(nnx.merge(graphdef, jax.jit(jax.grad(loss))(params)))

    for name in ARCHITECTURES:
        hf = tiny_hf_model(name)
        scanned, separate = load_pretrained(hf), load_pretrained(hf, scan_layers=False)
        assert isinstance(separate.layers, nnx.List)
        assert len(separate.layers) == hf.config.num_hidden_layers
        logits = np.asarray(forward(separate, ids, mask))
        valid = np.asarray(mask, bool)
        np.testing.assert_allclose(logits[valid], hf_logits(hf, ids, mask)[valid], atol=1e-4,
                                   err_msg=name)
        separate.remat = "full"
        if name in GRADIENT_CHECKS:
            scanned_grads = hf_named_grads(scanned)
            for tensor, grad in hf_named_grads(separate).items():  # float32 rounding is relative
                scale = np.abs(scanned_grads[tensor]).max()  # to the tensor's scale, not each
                np.testing.assert_allclose(grad, scanned_grads[tensor],  # element's
                                           atol=1e-5 * scale, err_msg=f"{name}: {tensor}")
        cache = init_cache(separate.config, ids.shape[0], ids.shape[1])
        _, cache = forward(separate, ids[:, :8], mask[:, :8], cache)
        for t in range(8, ids.shape[1]):
            step, cache = forward(separate, ids[:, t:t + 1], mask[:, t:t + 1], cache)
            np.testing.assert_allclose(np.asarray(step)[valid[:, t], 0], logits[valid[:, t], t],
                                       atol=1e-4, err_msg=f"{name}: decode step {t}")
        save_pretrained(separate, tmp_path / name)
        chex.assert_trees_all_equal(to_tensors(load_pretrained(tmp_path / name)),
                                    to_tensors(scanned))


@pytest.mark.parametrize("name", MOE)
def test_load_balancing_loss_matches_transformers(name):
    """Switch Transformer's loss as transformers pools it over layers and non-pad tokens
    (`load_balancing_loss_func` with the attention mask)."""
    from align_jax.models.moe import collect_router_loss, router_loss

    hf = tiny_hf_model(name)
    ids, mask = left_padded_batch(8)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      output_router_logits=True).aux_loss.item()
    hf.config.output_router_logits = True  # the coefficient applies in training (else 0)
    model = load_pretrained(hf)
    collect_router_loss(model)
    _, sown = nnx.capture(lambda m: m(jnp.asarray(ids), jnp.asarray(mask)), nnx.Intermediate)(model)
    term, loss = router_loss(sown)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(term), hf.config.router_aux_loss_coef * expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", *MOE])
def test_sequence_classifier_of_each_family_scores_like_transformers(name, tmp_path):
    """A reward model or critic of each family: transformers' one-label classifier, saved, loaded
    with its scalar head, scores each row at its last non-pad token; saved again, it reloads as
    the family's classifier with the same scores."""
    torch.manual_seed(0)
    config = ARCHITECTURES[name]()
    config._attn_implementation = "eager"
    config.num_labels, config.pad_token_id = 1, 0
    hf = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids, mask = left_padded_batch(9)
    ids = np.where(mask.astype(bool), np.maximum(ids, 1), 0)  # pad id 0 on pads only
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
    model = load_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(model.score(jnp.asarray(ids), jnp.asarray(mask)), expected.numpy(),
                               atol=1e-5)
    save_pretrained(model, tmp_path / "ours")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "ours", pad_token_id=0, attn_implementation="eager").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        rescored = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(rescored[:, 0].numpy(), expected.numpy(), atol=1e-5)
