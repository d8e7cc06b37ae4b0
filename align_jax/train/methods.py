"""What each method optimises, on one micro-batch: models → log-probs or scores → `losses.*`.

Every function has the signature `(model, ref_model, batch, cfg) -> (numerator, denominator,
metrics)`: the loss of the whole batch is Σ numerator / Σ denominator over its micro-batches
(tokens for SFT, pairs or examples otherwise), so gradient accumulation is exact for every loss
whose examples do not depend on each other; `check_micro_batches` refuses the others. `ref_model` is
the frozen reference (None when a method or config needs none); its outputs carry no gradient.
Metric names follow TRL.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from align_jax import losses, ops
from align_jax.config import ConfigError, LossConfig, RLConfig
from align_jax.data import PackedPairs, PreferenceBatch, SequenceBatch, UnpairedBatch


def completion_logps(model, seq: SequenceBatch, *, correct: bool = False
                     ) -> tuple[dict[str, jax.Array], jax.Array]:
    """Statistics of each next token [B, T-1] (`ops.head_token_stats`: "logps", and "correct",
    whether it is the argmax, when asked; the LM head chunked by `model.logits_chunk`), and the
    completion mask over them."""
    hidden_BxTxD, _ = model.hidden_states(seq.ids_BxT, seq.attention_mask_BxT)
    stats = ops.head_token_stats(model.logits, hidden_BxTxD[:, :-1], seq.ids_BxT[:, 1:],
                                 chunk=model.logits_chunk, correct=correct)
    return stats, seq.completion_mask_BxT[:, 1:]


def _concat(a: SequenceBatch, b: SequenceBatch) -> SequenceBatch:
    return SequenceBatch(*(jnp.concatenate([x, y]) for x, y in zip(a, b)))


def packed_pair_logps(model, batch: PackedPairs) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs [B, 2, C] of the chosen (c = 0) and rejected (c = 1) completions of
    pairs packed one per row: one forward over prompt | chosen | rejected, and the LM head on the
    2C predicting slots only (never on prompt positions)."""
    hidden_BxTxD, _ = model.hidden_states(batch.ids_BxT, batch.attention_mask_BxT,
                                          segment_ids_BxT=batch.segment_ids_BxT)
    B, _, C = batch.logit_index_Bx2xC.shape
    index_Bx2C = batch.logit_index_Bx2xC.reshape(B, 2 * C)
    hidden_Bx2CxD = jnp.take_along_axis(hidden_BxTxD, index_Bx2C[..., None], axis=1)
    logps = ops.head_token_stats(model.logits, hidden_Bx2CxD, batch.labels_Bx2xC.reshape(B, 2 * C),
                                 chunk=model.logits_chunk)["logps"]
    return logps.reshape(B, 2, C), batch.label_mask_Bx2xC


class PairLogps(NamedTuple):
    """What `pair_logps` computes for B preference pairs."""

    chosen_B: jax.Array  # Σ log π over the chosen completion's tokens
    rejected_B: jax.Array
    chosen_lengths_B: jax.Array  # completion token counts
    rejected_lengths_B: jax.Array
    # [B, T-1] (pairs as rows) or [B, C] (packed): per-token log π of chosen
    chosen_token_logps: jax.Array
    chosen_token_mask: jax.Array  # the same shape, True on the chosen completion's tokens


def pair_logps(model, batch: PreferenceBatch | PackedPairs) -> PairLogps:
    """Summed completion log-probs of chosen and rejected (one forward over 2B rows, or over B
    packed rows), their lengths, and the chosen completions' per-token log-probs for RPO/ORPO's
    NLL."""
    if isinstance(batch, PackedPairs):
        logps_Bx2xC, mask = packed_pair_logps(model, batch)
        sums, lengths = ops.masked_sum(logps_Bx2xC, mask, axis=2), jnp.sum(mask, axis=2)
        return PairLogps(sums[:, 0], sums[:, 1], lengths[:, 0], lengths[:, 1], logps_Bx2xC[:, 0],
                         mask[:, 0])
    stats, mask = completion_logps(model, _concat(batch.chosen, batch.rejected))
    logps = stats["logps"]
    sums, lengths = ops.masked_sum(logps, mask, axis=1), jnp.sum(mask, axis=1)
    B = batch.chosen.ids_BxT.shape[0]
    return PairLogps(sums[:B], sums[B:], lengths[:B], lengths[B:], logps[:B], mask[:B])


def sft(model, ref_model, batch: SequenceBatch, cfg: LossConfig):
    """Token-level NLL, −Σ log π(y_t | y_<t) / #tokens, on completion tokens (or all when not
    `completion_only`)."""
    stats, mask = completion_logps(model, batch, correct=True)
    if not cfg.completion_only:
        mask = batch.attention_mask_BxT[:, 1:] & batch.attention_mask_BxT[:, :-1]
    metrics = {"mean_token_accuracy": ops.masked_mean(stats["correct"].astype(jnp.float32), mask),
               "num_tokens": jnp.sum(mask).astype(jnp.float32)}
    return -ops.masked_sum(stats["logps"], mask), jnp.sum(mask).astype(jnp.float32), metrics


def reward(model, ref_model, batch: PreferenceBatch, cfg: LossConfig):
    """Bradley-Terry on the scalar head's score at each sequence's last token."""
    B = batch.chosen.ids_BxT.shape[0]
    both = _concat(batch.chosen, batch.rejected)
    scores = model.score(both.ids_BxT, both.attention_mask_BxT)
    per_pair, m = losses.bradley_terry_loss(scores[:B], scores[B:], margin=batch.margin_B,
                                            center_coef=cfg.center_coef)
    metrics = {"accuracy": m["accuracy"], "margin": m["margin"],
               "rewards/chosen": jnp.mean(scores[:B]), "rewards/rejected": jnp.mean(scores[B:])}
    return jnp.sum(per_pair), jnp.float32(B), metrics


def dpo(model, ref_model, batch: PreferenceBatch | PackedPairs, cfg: LossConfig):
    """The DPO family (`loss_type` ∈ losses.DPO_LOSSES), SimPO (`simpo`) and ORPO (`orpo`, with
    its NLL term); `rpo_alpha` adds α · NLL of the chosen completions (RPO, Pang et al. 2024)."""
    chosen, rejected, chosen_len, rejected_len, chosen_tok, chosen_mask = pair_logps(model, batch)
    B = chosen.shape[0]
    # over the batch's tokens
    nll = -ops.masked_sum(chosen_tok, chosen_mask) / jnp.maximum(jnp.sum(chosen_mask), 1)
    if cfg.loss_type == "simpo":
        per_pair, metrics = losses.simpo_loss(chosen, rejected, chosen_len, rejected_len,
                                              beta=cfg.beta, gamma=cfg.simpo_gamma,
                                              label_smoothing=cfg.label_smoothing,
                                              length_normalize=cfg.simpo_length_normalize)
    elif cfg.loss_type == "orpo":
        per_pair, metrics = losses.orpo_loss(chosen, rejected, chosen_len, rejected_len,
                                             beta=cfg.beta)
        per_pair = per_pair + nll
    else:
        if batch.ref_chosen_logps_B is not None:
            ref_chosen, ref_rejected = batch.ref_chosen_logps_B, batch.ref_rejected_logps_B
        elif cfg.reference_free:
            ref_chosen = ref_rejected = jnp.zeros_like(chosen)
        else:
            ref = jax.lax.stop_gradient(pair_logps(ref_model, batch))
            ref_chosen, ref_rejected = ref.chosen_B, ref.rejected_B
        per_pair, metrics = losses.dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing, chosen_lengths=chosen_len,
            rejected_lengths=rejected_len, reference_free=cfg.reference_free)
    if cfg.rpo_alpha is not None:
        per_pair = per_pair + cfg.rpo_alpha * nll
    metrics = dict(metrics, nll_loss=jax.lax.stop_gradient(nll))
    return jnp.sum(per_pair), jnp.float32(B), metrics


def kto(model, ref_model, batch: UnpairedBatch, cfg: LossConfig):
    """KTO with z0 from the batch's mismatched (prompt, other completion) pairs, as TRL."""
    def summed(m, seq):
        stats, mask = completion_logps(m, seq)
        return ops.masked_sum(stats["logps"], mask, axis=1)

    logps, kl_logps = (summed(model, batch.sequences),
                       jax.lax.stop_gradient(summed(model, batch.mismatched)))
    ref_logps = jax.lax.stop_gradient(summed(ref_model, batch.sequences))
    kl_ref_logps = jax.lax.stop_gradient(summed(ref_model, batch.mismatched))
    per_example, metrics = losses.kto_loss(
        logps, ref_logps, batch.label_B, beta=cfg.beta, kl_logps=kl_logps,
        kl_ref_logps=kl_ref_logps, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight, loss_type=cfg.loss_type)
    return jnp.sum(per_example), jnp.float32(logps.shape[0]), metrics


class Method(NamedTuple):
    """An offline method: its loss, the dataset kind it trains on, and whether it needs a frozen
    reference model (before `needs_reference`'s config-dependent exceptions)."""

    loss: Callable
    data_kind: str
    needs_reference: bool


METHODS: dict[str, Method] = {
    "sft": Method(sft, "prompt_completion", needs_reference=False),
    "reward": Method(reward, "preference", needs_reference=False),
    "dpo": Method(dpo, "preference", needs_reference=True),
    "kto": Method(kto, "unpaired_preference", needs_reference=True),
}


def needs_reference(method: str, cfg: LossConfig) -> bool:
    if method == "dpo":
        return (cfg.loss_type not in ("simpo", "orpo") and not cfg.reference_free
                and not cfg.precompute_ref_logps)
    return METHODS[method].needs_reference


def _batch_coupling(method: str, cfg: LossConfig | RLConfig) -> str | None:
    """The config key and why its loss of one example depends on other examples of the batch (so a
    micro-batch's loss is not its share of the batch's), or None when every example's loss is its
    own."""
    loss_type = getattr(cfg, "loss_type", None)
    if method == "dpo" and loss_type in ("aot", "aot_unpaired"):
        return f"loss.loss_type={loss_type} sorts the whole batch's log-ratios"
    if method == "dpo" and loss_type == "orpo":
        return "loss.loss_type=orpo adds the NLL averaged over all the batch's chosen tokens"
    if method == "dpo" and cfg.rpo_alpha is not None:
        return (f"loss.rpo_alpha={cfg.rpo_alpha} adds the NLL averaged over all the batch's chosen "
                "tokens")
    if method == "kto" and loss_type == "kto":
        return ("loss.loss_type=kto takes its reference point z0 from the whole batch's mismatched "
                "pairs")
    if method == "grpo" and getattr(cfg, "aggregation", None) == "batch_token_mean":
        return "rl.aggregation=batch_token_mean divides by the token count of the whole batch"
    return None


def check_micro_batches(method: str, cfg: LossConfig | RLConfig, micro_batches: int) -> None:
    """Raise ConfigError when `micro_batches` > 1 would change the loss: the step's accumulation
    Σ numerator / Σ denominator is the full batch's loss only when each example's loss is its
    own."""
    coupling = _batch_coupling(method, cfg)
    if micro_batches > 1 and coupling is not None:
        raise ConfigError(f"train.micro_batches={micro_batches}: {coupling}, which micro-batches "
                          "would split; use train.micro_batches=1")
