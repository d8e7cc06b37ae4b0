"""The sampler against transformers.generate, the trainer's log-probs, and the softmax it
samples."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from align_jax import ops, sampling
from align_jax.data import bucket
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import load_pretrained
from align_jax.sampling import (
    SamplingConfig,
    encode_prompts,
    filter_logits,
    generate,
    generate_from_text,
    generate_text,
    sample_categorical,
    sequence_kl,
)
from tests.models.test_hf_parity import left_padded_batch, tiny_hf_model


@pytest.fixture(scope="module")
def llama():
    hf = tiny_hf_model("llama")
    return hf, load_pretrained(hf)


@pytest.mark.parametrize("name", ["llama", "qwen3_qk_norm", "mistral_sliding_window"])
def test_greedy_equals_transformers_generate(name):
    hf = tiny_hf_model(name)
    model = load_pretrained(hf)
    ids, mask = left_padded_batch(0, T=12)
    out = generate(model, ids, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=10, greedy=True))
    with torch.no_grad():
        expected = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               do_sample=False, max_new_tokens=10, pad_token_id=0,
                               eos_token_id=None)[:, 12:].numpy()
    np.testing.assert_array_equal(np.asarray(out.ids_BxC), expected)
    assert np.all(np.asarray(out.mask_BxC)) and np.all(np.asarray(out.truncated_B))


def test_stop_tokens_end_rows_and_are_included_in_the_mask(llama):
    hf, model = llama
    ids, mask = left_padded_batch(1, T=12)
    free = generate(model, ids, mask, jax.random.key(0),
                    SamplingConfig(max_new_tokens=12, greedy=True))
    stop = int(free.ids_BxC[0, 3])  # make row 0's fourth token a stop token
    out = generate(model, ids, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=(stop,),
                                  pad_token_id=-1))
    first_stop = [list(r).index(stop) + 1 if stop in list(r) else 12
                  for r in np.asarray(free.ids_BxC)]
    np.testing.assert_array_equal(out.lengths_B, first_stop)
    for row, n in enumerate(first_stop):
        np.testing.assert_array_equal(out.ids_BxC[row, :n], free.ids_BxC[row, :n])
        assert np.all(np.asarray(out.ids_BxC[row, n:]) == -1)
        assert bool(out.truncated_B[row]) == (n == 12
                                              and stop not in list(np.asarray(free.ids_BxC[row])))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_equal_teacher_forced_forward(llama, temperature):
    _, model = llama
    ids, mask = left_padded_batch(2, T=12)
    config = SamplingConfig(max_new_tokens=9, num_samples=2, temperature=temperature, top_k=20,
                            stop_token_ids=(5, 7))
    out = generate(model, ids, mask, jax.random.key(3), config)
    prompt_ids, prompt_mask = np.repeat(ids, 2, 0), np.repeat(mask, 2, 0)
    full_ids = np.concatenate([prompt_ids, np.asarray(out.ids_BxC)], 1)
    full_mask = np.concatenate([prompt_mask, np.asarray(out.mask_BxC)], 1)
    logits = model(jnp.asarray(full_ids), jnp.asarray(full_mask)) / temperature
    teacher = ops.token_logps(logits[:, 11:-1], jnp.asarray(full_ids[:, 12:]))
    m = np.asarray(out.mask_BxC)
    np.testing.assert_allclose(np.asarray(out.logps_BxC)[m], np.asarray(teacher)[m], atol=1e-5)
    assert np.all(np.asarray(out.logps_BxC)[~m] == 0)


def test_sequence_kl_is_the_summed_log_ratio_against_a_pytorch_reference(llama):
    """k1 per completion = Σ_t log π(y_t) − log π_ref(y_t), π_ref's log-probs from `transformers` on
    perturbed weights (positions counted from the first real token); 0 against the policy itself."""
    hf, model = llama
    reference_hf = copy.deepcopy(hf)
    with torch.no_grad():
        for p in reference_hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = left_padded_batch(4, T=12)
    config = SamplingConfig(max_new_tokens=8, num_samples=2, temperature=0.8, stop_token_ids=(5, 7))
    out = generate(model, ids, mask, jax.random.key(1), config)
    reference = load_pretrained(reference_hf)
    kl = sequence_kl(reference, ids, mask, out, num_samples=2, temperature=0.8)
    reference.logits_chunk = 3  # the LM head over 3 of the 8 completion positions at a time
    np.testing.assert_allclose(sequence_kl(reference, ids, mask, out, num_samples=2,
                                           temperature=0.8), kl, rtol=1e-5, atol=1e-5)
    full_ids = np.concatenate([np.repeat(ids, 2, 0), np.asarray(out.ids_BxC)], 1)
    full_mask = np.concatenate([np.repeat(mask, 2, 0), np.asarray(out.mask_BxC)], 1)
    with torch.no_grad():
        logits = reference_hf(
            input_ids=torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
            position_ids=torch.tensor(np.maximum(np.cumsum(full_mask, 1) - 1, 0))).logits
    ref = torch.log_softmax(logits[:, 11:-1].double() / 0.8, -1).numpy()
    ref = np.take_along_axis(ref, full_ids[:, 12:, None], -1)[..., 0]
    m = np.asarray(out.mask_BxC)
    expected = np.sum(np.where(m, np.asarray(out.logps_BxC) - ref, 0.0), axis=1)
    np.testing.assert_allclose(np.asarray(kl), expected, atol=1e-4)
    assert np.all(np.abs(expected) > 1e-3)  # the perturbation is visible
    np.testing.assert_allclose(sequence_kl(model, ids, mask, out, num_samples=2, temperature=0.8),
                               0, atol=1e-4)


def np_filtered_probs(logits, top_k, top_p, min_p):
    """transformers' warpers, written out: top-k, then the top-p nucleus, then min-p."""
    z = np.asarray(logits, np.float64)
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
        p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    if min_p:
        keep &= p >= min_p * p.max()
        p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    return p


@pytest.mark.parametrize("filters", [dict(), dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2),
                                     dict(temperature=0.5, top_k=8, top_p=0.9)])
def test_sampled_frequencies_match_the_filtered_softmax(llama, filters):
    _, model = llama
    ids, mask = left_padded_batch(3, T=12)
    ids, mask = ids[:1], mask[:1]
    n = 6000
    config = SamplingConfig(max_new_tokens=1, num_samples=n, **filters)
    out = generate(model, ids, mask, jax.random.key(7), config)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[0, -1] / config.temperature
    p = np_filtered_probs(logits, config.top_k, config.top_p, config.min_p)
    freq = np.bincount(np.asarray(out.ids_BxC[:, 0]), minlength=p.size) / n
    bound = 5 * np.sqrt(p * (1 - p) / n) + 1e-9  # 5 standard errors per token
    assert np.all(np.abs(freq - p) <= bound), np.abs(freq - p).max()
    assert np.all(freq[p == 0] == 0)


def test_sample_categorical_draws_the_softmax_and_never_a_zero_probability_token():
    # Zero-probability tokens at the start, in the middle and at the end of the vocabulary.
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.array([neg, 2.0, 0.5, neg, -1.0, 1.0, 3.0, neg])
    n = 40000
    draws = sample_categorical(jax.random.key(3), jnp.broadcast_to(logits, (n, logits.size)))
    p = np.asarray(jax.nn.softmax(logits))
    freq = np.bincount(np.asarray(draws), minlength=p.size) / n
    assert np.all(freq[p == 0] == 0)
    bound = 5 * np.sqrt(p * (1 - p) / n) + 1e-9
    assert np.all(np.abs(freq - p) <= bound), np.abs(freq - p).max()


def test_filter_logits_keeps_the_best_token():
    logits = jnp.array([[3.0, 1.0, 0.0, -1.0]])
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        kept = np.asarray(filter_logits(logits, **kw)) > -1e30
        np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_deterministic_for_a_key_and_different_across_keys(llama):
    _, model = llama
    ids, mask = left_padded_batch(4, T=12)
    config = SamplingConfig(max_new_tokens=8, num_samples=3)
    a = generate(model, ids, mask, jax.random.key(1), config)
    b = generate(model, ids, mask, jax.random.key(1), config)
    c = generate(model, ids, mask, jax.random.key(2), config)
    np.testing.assert_array_equal(a.ids_BxC, b.ids_BxC)
    assert not np.array_equal(np.asarray(a.ids_BxC), np.asarray(c.ids_BxC))
    assert a.ids_BxC.shape == (9, 8)


def test_bad_settings_and_buckets():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="invalid filters"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    assert bucket(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        bucket(65, (32, 64))


def test_text_prompts_are_left_padded_to_a_bucket_and_completions_decode_their_tokens():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    model = load_pretrained(hf)
    prompts = ["Review: the plot was dull and", "What is 7*8?",
               [{"role": "user", "content": "What is 1+2?"}]]
    ids, mask = encode_prompts(tok, prompts)
    rendered = [*prompts[:2],
                tok.apply_chat_template(prompts[2], tokenize=False, add_generation_prompt=True)]
    for row, text in enumerate(rendered):
        expected = tok(text, add_special_tokens=False)["input_ids"]
        width = ids.shape[1]
        assert width == bucket(max(len(tok(t, add_special_tokens=False)["input_ids"])
                                   for t in rendered), (32, 64))
        np.testing.assert_array_equal(ids[row, width - len(expected):], expected)
        assert (not np.any(mask[row, :width - len(expected)])
                and np.all(mask[row, width - len(expected):]))

    config = SamplingConfig(max_new_tokens=8, num_samples=2)
    texts, out = generate_from_text(model, tok, prompts, jax.random.key(0), config)
    assert texts == generate_text(model, tok, prompts, jax.random.key(0), config)
    assert len(texts) == 6 and out.ids_BxC.shape == (6, 8)
    for text, row, row_mask in zip(texts, np.asarray(out.ids_BxC), np.asarray(out.mask_BxC)):
        assert text == tok.decode(row[row_mask], skip_special_tokens=True)


def _row(ids, mask):
    return [int(t) for t, m in zip(ids, mask) if m]


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_continuing_from_the_cache_equals_generating_from_the_whole_conversation(name):
    """Turn 1 (rows stop at different steps), then each row extended by a different number of
    tokens (one row not resumed) and turn 2 decoded from the cache, with masked slots between the
    turns: every row's turn 2 equals greedy generation from its conversation so far as one
    prompt, tokens and log-probs (sliding windows count tokens, not slots)."""
    model = load_pretrained(tiny_hf_model(name))
    ids, mask = left_padded_batch(4, T=10)
    free = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6,
                                                                      greedy=True))
    stop = int(free.ids_BxC[1, 2])
    config = SamplingConfig(max_new_tokens=6, greedy=True, stop_token_ids=(stop,))
    turn = jax.jit(lambda d: sampling.decode(model, d, jax.random.key(1), config))
    start = jax.jit(lambda i, m: sampling.prefill(model, i, m, num_samples=1, slots=40))(
        jnp.asarray(ids), jnp.asarray(mask))
    first, d = turn(start)
    assert len(set(np.asarray(first.lengths_B).tolist())) > 1  # the rows stopped apart
    extra = [[11, 12, 13], [], [21]]
    resume = np.array([True, False, True])
    block = np.array([[0] * (3 - len(e)) + e for e in extra])
    d = jax.jit(lambda *a: sampling.extend(model, *a))(
        d, jnp.asarray(block), jnp.asarray(block > 0), jnp.asarray(resume))
    second, _ = turn(d)
    assert np.asarray(second.lengths_B)[1] == 0
    for b in np.flatnonzero(resume):
        history = _row(ids[b], mask[b]) + _row(first.ids_BxC[b], first.mask_BxC[b]) + extra[b]
        again = generate(model, np.array([history]), np.ones((1, len(history)), bool),
                         jax.random.key(1), config)
        np.testing.assert_array_equal(second.ids_BxC[b], again.ids_BxC[0])
        np.testing.assert_allclose(second.logps_BxC[b], again.logps_BxC[0], atol=1e-5)
