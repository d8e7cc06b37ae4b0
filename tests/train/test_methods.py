"""Each method's loss on a batch = the paper's formula (NumPy, float64) on transformers' logits for
the same weights; and gradient accumulation over micro-batches equals the full batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from align_jax import losses
from align_jax.config import ConfigError, LossConfig, RLConfig
from align_jax.data import PreferenceBatch, SequenceBatch, UnpairedBatch, collate
from align_jax.models import Decoder, load_pretrained
from align_jax.train import methods
from align_jax.train.mesh import make_mesh
from align_jax.train.models import Frozen, Models
from align_jax.train.state import init_train_state
from align_jax.train.step import make_train_step
from tests.models.test_hf_parity import hf_logits, tiny_hf_model
from tests.np_ref import log_sigmoid, log_softmax


@pytest.fixture(scope="module")
def policy_and_reference():
    policy = tiny_hf_model("llama")
    reference = tiny_hf_model("llama")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def sequences(seed, B=4, L=14, vocab=101):
    """Right-padded rows: prompt of 3–5 tokens, completion of 2–7, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(B, L)).astype(np.int32)
    attention, completion = np.zeros((B, L), bool), np.zeros((B, L), bool)
    for i in range(B):
        p, c = rng.integers(3, 6), rng.integers(2, 8)
        attention[i, : p + c], completion[i, p: p + c] = True, True
        ids[i, p + c:] = 0
    return SequenceBatch(ids, attention, completion)


def pairs(seed, B=4, vocab=101, share_prompt=False):
    """Preference pairs with a shared prompt of 0–5 tokens and completions of 1–7 (a prompt-less
    pair has nothing to predict its completions' first tokens), unpacked or packed one per row."""
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(1, vocab, n).tolist()  # noqa: E731
    examples = [{"prompt_ids": tokens(p), "chosen_ids": tokens(rng.integers(1, 8)),
                 "rejected_ids": tokens(rng.integers(1, 8))}
                for p in [0, *rng.integers(1, 6, B - 1)]]
    return collate(examples, "preference", (8, 16), pad_id=0, share_prompt=share_prompt)


def np_completion_logps(hf, seq):
    """Σ over completion tokens of log softmax(logits)[next token], from transformers (float64)."""
    logps = log_softmax(hf_logits(hf, seq.ids_BxT, seq.attention_mask_BxT.astype(np.int64)))
    token = np.take_along_axis(logps[:, :-1], seq.ids_BxT[:, 1:, None], axis=-1)[..., 0]
    mask = seq.completion_mask_BxT[:, 1:]
    return (token * mask).sum(1), mask.sum(1), token, mask


def ours(loss_fn, hf, ref_hf, batch, cfg):
    model = load_pretrained(hf)
    ref = load_pretrained(ref_hf) if ref_hf is not None else None
    num, den, metrics = loss_fn(model, ref, jax.tree.map(jnp.asarray, batch), cfg)
    return float(num / den), metrics


def test_sft_is_the_mean_token_nll_on_completions(policy_and_reference):
    hf, _ = policy_and_reference
    seq = sequences(0)
    _, _, token, mask = np_completion_logps(hf, seq)
    loss, metrics = ours(methods.sft, hf, None, seq, LossConfig())
    np.testing.assert_allclose(loss, -(token * mask).sum() / mask.sum(), rtol=1e-5)
    full = seq.attention_mask_BxT[:, 1:] & seq.attention_mask_BxT[:, :-1]
    loss_all, _ = ours(methods.sft, hf, None, seq, LossConfig(completion_only=False))
    np.testing.assert_allclose(loss_all, -(token * full).sum() / full.sum(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()


@pytest.mark.parametrize("share_prompt", [False, True], ids=["pairs", "packed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "simpo w/o LN", "orpo"])
def test_dpo_family_on_transformers_logits(loss_type, share_prompt, policy_and_reference):
    """Against transformers on prompt + chosen and prompt + rejected as rows of their own, in both
    layouts: pairs as 2B rows, and packed as B rows of prompt | chosen | rejected."""
    hf, ref_hf = policy_and_reference
    chosen, rejected = pairs(1)[:2]
    batch = pairs(1, share_prompt=share_prompt)
    beta = 0.3
    cw, lw, tok_w, mask_w = np_completion_logps(hf, chosen)
    cl, ll, _, _ = np_completion_logps(hf, rejected)
    rw, _, _, _ = np_completion_logps(ref_hf, chosen)
    rl, _, _, _ = np_completion_logps(ref_hf, rejected)
    nll = -(tok_w * mask_w).sum() / mask_w.sum()
    if loss_type == "sigmoid":  # Rafailov et al. eq. 7
        expected = -log_sigmoid(beta * ((cw - rw) - (cl - rl)))
    elif loss_type == "ipo":  # Azar et al. eq. 17 on per-token-averaged log-ratios (TRL)
        expected = ((cw - rw) / lw - (cl - rl) / ll - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":  # Meng et al. eq. 6
        expected = -log_sigmoid(beta * cw / lw - beta * cl / ll - 0.5)
    elif loss_type == "simpo w/o LN":  # Meng et al. Table 5's ablation: summed log-probs
        expected = -log_sigmoid(beta * cw - beta * cl - 0.5)
    else:  # Hong et al. eq. 7 plus the NLL of the chosen completion
        odds = lambda avg: avg - np.log1p(-np.exp(avg))  # noqa: E731
        expected = -beta * log_sigmoid(odds(cw / lw) - odds(cl / ll)) + nll
    kind = ({"loss_type": "simpo", "simpo_length_normalize": False} if loss_type == "simpo w/o LN"
            else {"loss_type": loss_type})
    loss, metrics = ours(methods.dpo, hf, ref_hf, batch, LossConfig(**kind, beta=beta))
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["nll_loss"]), nll, rtol=2e-5)
    rpo, _ = ours(methods.dpo, hf, ref_hf, batch, LossConfig(**kind, beta=beta, rpo_alpha=0.5))
    np.testing.assert_allclose(rpo, expected.mean() + 0.5 * nll, rtol=2e-5)


def test_reward_model_scores_the_last_token_with_bradley_terry(policy_and_reference):
    hf, _ = policy_and_reference
    chosen, rejected = sequences(3), sequences(4)
    model = load_pretrained(hf)
    rm = Decoder(model.config, rngs=nnx.Rngs(0), with_scalar_head=True)
    nnx.update(rm, nnx.state(model))
    w = np.asarray(rm.score_head.kernel.get_value())[:, 0]
    hidden = lambda seq: np.asarray(rm.hidden_states(jnp.asarray(seq.ids_BxT),  # noqa: E731
                                                     jnp.asarray(seq.attention_mask_BxT))[0])
    last = lambda seq: seq.attention_mask_BxT.sum(1) - 1  # noqa: E731
    score = lambda seq: hidden(seq)[np.arange(4), last(seq)] @ w  # noqa: E731
    margin = np.array([0.0, 0.5, 1.0, -0.2], np.float32)
    expected = (-log_sigmoid(score(chosen) - score(rejected) - margin)
                + 0.01 * (score(chosen) + score(rejected)) ** 2)
    num, den, _ = methods.reward(rm, None, jax.tree.map(jnp.asarray,
                                                        PreferenceBatch(chosen, rejected, margin)),
                                 LossConfig(center_coef=0.01))
    np.testing.assert_allclose(float(num / den), expected.mean(), rtol=1e-4)


def test_kto_uses_mismatched_pairs_for_its_reference_point(policy_and_reference):
    hf, ref_hf = policy_and_reference
    seq, mismatched = sequences(5), sequences(6)
    label = np.array([True, False, True, False])
    beta = 0.2
    logp, _, _, _ = np_completion_logps(hf, seq)
    ref, _, _, _ = np_completion_logps(ref_hf, seq)
    kl, _, _, _ = np_completion_logps(hf, mismatched)
    kl_ref, _, _, _ = np_completion_logps(ref_hf, mismatched)
    z0 = max((kl - kl_ref).mean(), 0.0)
    r = logp - ref
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = np.where(label, 1 - sig(beta * (r - z0)), 1 - sig(beta * (z0 - r)))
    loss, metrics = ours(methods.kto, hf, ref_hf, UnpairedBatch(seq, label, mismatched),
                         LossConfig(beta=beta, loss_type="kto"))
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["kl"]), z0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["sft", "dpo", "dpo packed"])
def test_micro_batches_give_the_full_batch_update(method, policy_and_reference):
    hf, _ = policy_and_reference
    model = load_pretrained(hf)
    pretrained = nnx.split(model)[1]
    initial = [np.array(p) for p in jax.tree.leaves(pretrained)]
    # Plain SGD, so the parameters move by exactly the accumulated gradient (Adam's first step,
    # lr·g/|g|, would magnify float32 summation-order noise in near-zero gradients).
    tx, mesh = optax.sgd(0.5), make_mesh()
    batch = (sequences(7, B=8) if method == "sft"
             else pairs(7, B=8, share_prompt=method == "dpo packed"))
    batch = jax.tree.map(jnp.asarray, batch)
    method = method.split()[0]
    loss_fn, cfg = methods.METHODS[method].loss, LossConfig()
    results = []
    for micro in (1, 4):
        graphdef, state, _ = init_train_state(lambda r: type(model)(model.config, rngs=r), tx,
                                              mesh, 0, pretrained)
        ref = Frozen(reference=jax.tree.map(jnp.copy, state.params) if method == "dpo" else None)
        step = jax.jit(make_train_step(loss_fn, Models(graphdef), tx, cfg, micro,
                                       optax.constant_schedule(0.0)))
        for _ in range(2):  # the second step sees a moved policy, so DPO's loss is not ln 2
            state, metrics = step(state, ref, batch)
        results.append((state, metrics))
    (full, m_full), (micro, m_micro) = results
    np.testing.assert_allclose(float(m_full["loss"]), float(m_micro["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_micro["grad_norm"]), rtol=1e-4)
    # Two float32 roundings separate the runs: the gradient summed over a different split of the
    # batch's tokens, relative to the leaf's largest update (measured ≤ 3e-6 of it; a wrong
    # micro-batch denominator is off by percents), and p + Δ itself, an ulp of p.
    for p0, a, b in zip(initial, jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
        a, b = np.asarray(a), np.asarray(b)
        bound = 1e-5 * np.abs(a - p0).max() + 2 * np.spacing(np.abs(a))
        assert (np.abs(a - b) <= bound).all(), \
            f"{a.shape}: {np.abs(a - b).max():.2e} > {bound.max():.2e}"


def _split_in_two(loss, *arrays):
    """The loss of each example, computed on the whole batch and on its two halves."""
    half = arrays[0].shape[0] // 2
    parts = [loss(*(a[s] for a in arrays)) for s in (slice(0, half), slice(half, None))]
    return np.asarray(loss(*arrays)), np.concatenate([np.asarray(p) for p in parts])


@pytest.mark.parametrize("loss_type", list(losses.DPO_LOSSES))
def test_micro_batches_are_refused_exactly_for_the_dpo_losses_that_couple_pairs(loss_type):
    """A loss type passes `check_micro_batches` if and only if each pair's loss is the same in
    the whole batch and in its half: then Σ numerator / Σ denominator is the full batch's loss."""
    rng = np.random.default_rng(8)
    logps = [jnp.asarray(rng.normal(-20.0, 5.0, 8), jnp.float32) for _ in range(4)]
    lengths = [jnp.asarray(rng.integers(1, 9, 8), jnp.float32) for _ in range(2)]
    smoothing = (0.1 if loss_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
                 else 0.0)

    def per_pair(cw, rw, cl, rl, lw, ll):
        return losses.dpo_loss(cw, rw, cl, rl, beta=0.1, loss_type=loss_type,
                               label_smoothing=smoothing, chosen_lengths=lw,
                               rejected_lengths=ll)[0]

    full, halves = _split_in_two(per_pair, *logps, *lengths)
    independent = np.allclose(full, halves, rtol=1e-6)
    cfg = LossConfig(loss_type=loss_type, label_smoothing=smoothing)
    methods.check_micro_batches("dpo", cfg, 1)
    if independent:
        methods.check_micro_batches("dpo", cfg, 2)
    else:
        with pytest.raises(ConfigError,
                           match=f"train.micro_batches=2: loss.loss_type={loss_type} "):
            methods.check_micro_batches("dpo", cfg, 2)


@pytest.mark.parametrize("loss_type", list(losses.KTO_LOSSES))
def test_micro_batches_are_refused_exactly_for_the_kto_losses_that_couple_examples(loss_type):
    rng = np.random.default_rng(9)
    logps = [jnp.asarray(rng.normal(-20.0, 5.0, 8), jnp.float32) for _ in range(4)]
    desirable = jnp.asarray(rng.random(8) < 0.5)

    def per_example(lp, ref, kl, kl_ref, label):
        return losses.kto_loss(lp, ref, label, beta=0.1, kl_logps=kl, kl_ref_logps=kl_ref,
                               loss_type=loss_type)[0]

    full, halves = _split_in_two(per_example, *logps, desirable)
    cfg = LossConfig(loss_type=loss_type)
    if np.allclose(full, halves, rtol=1e-6):
        methods.check_micro_batches("kto", cfg, 4)
    else:
        with pytest.raises(ConfigError, match="loss.loss_type=kto .*use train.micro_batches=1"):
            methods.check_micro_batches("kto", cfg, 4)


@pytest.mark.parametrize("method,cfg,key", [
    ("dpo", LossConfig(loss_type="orpo"), "loss.loss_type=orpo"),
    ("dpo", LossConfig(rpo_alpha=1.0), "loss.rpo_alpha=1.0"),
    ("dpo", LossConfig(loss_type="simpo", rpo_alpha=0.5), "loss.rpo_alpha=0.5"),
    ("grpo", RLConfig(aggregation="batch_token_mean"), "rl.aggregation=batch_token_mean"),
])
def test_micro_batches_are_refused_for_batch_wide_token_means(method, cfg, key):
    """ORPO's and RPO's NLL and BNPO's aggregation divide by the whole batch's token count."""
    methods.check_micro_batches(method, cfg, 1)
    with pytest.raises(ConfigError, match=f"train.micro_batches=2: {key} "):
        methods.check_micro_batches(method, cfg, 2)


@pytest.mark.parametrize("method,cfg", [
    ("sft", LossConfig()), ("reward", LossConfig(center_coef=0.01)),
    ("dpo", LossConfig(loss_type="simpo")), ("dpo", LossConfig(loss_type="sigmoid")),
    ("grpo", RLConfig()), ("grpo", RLConfig(aggregation="token_mean")), ("ppo", RLConfig()),
])
def test_micro_batches_are_allowed_for_losses_of_independent_examples(method, cfg):
    methods.check_micro_batches(method, cfg, 4)
