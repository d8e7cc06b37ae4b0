"""Pairwise and unpaired preference losses: the DPO family, SimPO, ORPO and KTO.

Every loss takes summed completion log-probs of shape [B] (one entry per pair or example),
returns the unreduced per-example loss [B] and a dict of scalar metrics named as in TRL.
Averaging the per-example losses with `jnp.mean` reproduces TRL's loss for the same inputs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from align_jax import ops

Array = jax.Array
Metrics = dict[str, Array]

log_sigmoid = jax.nn.log_sigmoid

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class _PairTerms(NamedTuple):
    """Everything a DPO-family loss may read; built once in `dpo_loss`."""

    beta: float
    label_smoothing: float
    discopop_tau: float
    delta: Array  # f'(u_w) - f'(u_l): the divergence-transformed margin (= h_θ for reverse KL)
    chosen_scores: Array  # f'(u_w), u = π/π_ref
    rejected_scores: Array
    chosen_logratios: Array  # log π(y_w) - log π_ref(y_w)
    rejected_logratios: Array
    policy_logratios: Array  # log π(y_w) - log π(y_l)
    ref_logratios: Array  # log π_ref(y_w) - log π_ref(y_l)
    chosen_lengths: Array | None
    rejected_lengths: Array | None


def _smoothed_sigmoid(x: Array, eps: float) -> Array:
    """cDPO (Mitchell 2023): -(1-ε) log σ(x) - ε log σ(-x); plain -log σ(x) at ε = 0."""
    return -(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def _length_normalised_delta(t: _PairTerms) -> Array:
    return t.chosen_scores / jnp.maximum(t.chosen_lengths, 1) - t.rejected_scores / jnp.maximum(
        t.rejected_lengths, 1
    )


def _sigmoid(t):  # DPO, Rafailov et al. 2023, eq. 7 (+ cDPO label smoothing)
    return _smoothed_sigmoid(t.beta * t.delta, t.label_smoothing)


def _hinge(t):  # SLiC, Zhao et al. 2023: max(0, 1 - β h)
    return jax.nn.relu(1.0 - t.beta * t.delta)


def _ipo(t):  # IPO, Azar et al. 2023, eq. 17, on per-token-averaged log-ratios as TRL
    return jnp.square(_length_normalised_delta(t) - 1.0 / (2.0 * t.beta))


def _sigmoid_norm(t):  # DPO on per-token-averaged log-ratios (TRL's `sigmoid_norm`)
    return -log_sigmoid(t.beta * _length_normalised_delta(t))


def _exo_pair(t):  # EXO, Ji et al. 2024, eq. 16: KL(p_θ ‖ [1-ε, ε]) over {chosen, rejected}
    eps = t.label_smoothing if t.label_smoothing > 0 else 1e-3
    x = t.beta * t.delta
    return jax.nn.sigmoid(x) * (log_sigmoid(x) - math.log1p(-eps)) + jax.nn.sigmoid(-x) * (
        log_sigmoid(-x) - math.log(eps)
    )


def _robust(t):  # rDPO, Chowdhury et al. 2024, eq. 10: unbiased under label flips with rate ε
    x, eps = t.beta * t.delta, t.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1.0 - 2.0 * eps)


def _nca_pair(t):  # NCA, Chen et al. 2024
    rw, rl = t.beta * t.chosen_scores, t.beta * t.rejected_scores
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


def _bco_pair(t):  # BCO, Jung et al. 2024, paired form without the running reward shift
    return -log_sigmoid(t.beta * t.chosen_scores) - log_sigmoid(-t.beta * t.rejected_scores)


def _sppo_hard(t):  # SPPO, Wu et al. 2024, eq. 4.7 with hard win probabilities 1 and 0
    half_inv_beta = 0.5 / t.beta
    return jnp.square(t.chosen_scores - half_inv_beta) + jnp.square(
        t.rejected_scores + half_inv_beta
    )


def _aot(t):  # AOT, Melnyk et al. 2024: sort-based stochastic dominance over the batch
    delta = jnp.sort(t.policy_logratios) - jnp.sort(t.ref_logratios)
    return _smoothed_sigmoid(t.beta * delta, t.label_smoothing)


def _aot_unpaired(t):
    delta = jnp.sort(t.chosen_logratios) - jnp.sort(t.rejected_logratios)
    return _smoothed_sigmoid(t.beta * delta, t.label_smoothing)


def _apo_zero(t):  # APO-zero, D'Oosterlinck et al. 2024, eq. 7
    return (1.0 - jax.nn.sigmoid(t.beta * t.chosen_logratios)) + jax.nn.sigmoid(
        t.beta * t.rejected_logratios
    )


def _apo_down(t):  # APO-down, eq. 8
    return jax.nn.sigmoid(t.beta * t.chosen_logratios) + (1.0 - jax.nn.sigmoid(t.beta * t.delta))


def _discopop(t):  # DiscoPOP, Chris Lu et al. 2024, eq. 5: logistic/exponential blend
    x = t.beta * t.delta
    mix = jax.nn.sigmoid(x / t.discopop_tau)
    return -log_sigmoid(x) * (1.0 - mix) + jnp.exp(-x) * mix


DPO_LOSSES: dict[str, Callable[[_PairTerms], Array]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
}
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
_USES_LENGTHS = ("ipo", "sigmoid_norm")


def f_divergence_scores(logratios: Array, f_divergence: str, alpha: float = 0.5) -> Array:
    """f'(u) for u = π/π_ref given log u, as in f-DPO (Wang et al. 2023, Table 1), constants
    dropped.

    reverse_kl: log u;  forward_kl: -1/u;  js_divergence: log σ(log u) = log(u/(1+u));
    alpha_divergence: u^(α-1)/(α-1), which is forward KL at α = 0 and tends to reverse KL as α→1.
    """
    if f_divergence == "reverse_kl" or (
        f_divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6
    ):
        return logratios
    if f_divergence == "forward_kl":
        return -jnp.exp(-logratios)
    if f_divergence == "js_divergence":
        return log_sigmoid(logratios)
    if f_divergence == "alpha_divergence":
        exponent = jnp.minimum((alpha - 1.0) * logratios, 80.0)  # keep exp finite in float32
        return jnp.exp(exponent) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence {f_divergence!r}; expected one of {F_DIVERGENCES}")


def _pair_metrics(chosen_rewards: Array, rejected_rewards: Array, chosen_logps, rejected_logps):
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
    }


def dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reference_free: bool = False,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[Array, Metrics]:
    """The DPO loss family of TRL's DPOTrainer, per pair.

    DPO (Rafailov et al. 2023):
    -log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]).
    Every `loss_type` of DPO_LOSSES replaces -log σ(β h) by its own function of the same log-ratios;
    `f_divergence` replaces each log-ratio log u by f'(u) first (f-DPO), and `reference_free`
    sets log π_ref = 0 (a uniform reference).

    Args:
      chosen_logps, rejected_logps: [B] summed log-probs of the completions under the policy.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference.
      beta: β, the strength of the KL constraint (τ for IPO); a float or a traced scalar.
      loss_type: a key of DPO_LOSSES.
      label_smoothing: ε, the assumed label-flip probability (sigmoid, robust, exo_pair, aot*).
      chosen_lengths, rejected_lengths: [B] completion token counts; required for `ipo` and
        `sigmoid_norm`, which average each log-ratio over its completion's tokens.
      reference_free: ignore the given reference log-probs.
      f_divergence: one of F_DIVERGENCES; f_alpha is α for `alpha_divergence`.
      discopop_tau: τ of the DiscoPOP blend.
    Returns:
      losses [B] and metrics: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected},
      where the implicit reward is β (log π - log π_ref).
    """
    chex.assert_rank([chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps], 1)
    chex.assert_equal_shape([chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps])
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSSES)}")
    if label_smoothing and loss_type not in _USES_LABEL_SMOOTHING:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}; "
            f"it is used by {_USES_LABEL_SMOOTHING}"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type in _USES_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
    if isinstance(beta, (int, float)) and beta <= 0:  # β may also be a traced array (sweeps)
        raise ValueError(f"beta must be positive, got {beta}")
    if reference_free:
        ref_chosen_logps = jnp.zeros_like(ref_chosen_logps)
        ref_rejected_logps = jnp.zeros_like(ref_rejected_logps)

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence, f_alpha)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence, f_alpha)
    terms = _PairTerms(
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        delta=chosen_scores - rejected_scores,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        policy_logratios=chosen_logps - rejected_logps,
        ref_logratios=ref_chosen_logps - ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    losses = DPO_LOSSES[loss_type](terms)
    metrics = _pair_metrics(
        beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps
    )
    return losses, metrics


def simpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    length_normalize: bool = True,
) -> tuple[Array, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ).

    Reference-free; the reward is the length-normalised log-likelihood β/|y| log π(y). With
    `length_normalize=False` the reward is β log π(y) (the paper's "w/o LN" ablation);
    `label_smoothing` applies the cDPO form. Inputs [B]; returns losses [B] and TRL metrics.
    """
    chex.assert_rank([chosen_logps, rejected_logps, chosen_lengths, rejected_lengths], 1)
    chex.assert_equal_shape([chosen_logps, rejected_logps, chosen_lengths, rejected_lengths])
    if length_normalize:
        chosen_avg = chosen_logps / jnp.maximum(chosen_lengths, 1)
        rejected_avg = rejected_logps / jnp.maximum(rejected_lengths, 1)
    else:
        chosen_avg, rejected_avg = chosen_logps, rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    losses = _smoothed_sigmoid(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)


def orpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """ORPO's odds-ratio term (Hong et al. 2024, eq. 7): -β log σ(log odds(y_w) - log odds(y_l)).

    odds(y) = P(y) / (1 - P(y)) with P(y) = exp(mean token log-prob), so
    log odds = ℓ - log(1 - e^ℓ) for the average log-prob ℓ. The caller adds the NLL (SFT) term on
    the chosen completion; λ of the paper is `beta` here, as in TRL. Inputs [B]; returns [B].
    """
    chex.assert_rank([chosen_logps, rejected_logps, chosen_lengths, rejected_lengths], 1)
    chex.assert_equal_shape([chosen_logps, rejected_logps, chosen_lengths, rejected_lengths])
    chosen_avg = chosen_logps / jnp.maximum(chosen_lengths, 1)
    rejected_avg = rejected_logps / jnp.maximum(rejected_lengths, 1)
    log_odds = (chosen_avg - rejected_avg) - (ops.log1mexp(chosen_avg) - ops.log1mexp(rejected_avg))
    log_odds_ratio = log_sigmoid(log_odds)
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg, chosen_logps, rejected_logps)
    metrics["log_odds_ratio"] = jnp.mean(jax.lax.stop_gradient(log_odds_ratio))
    metrics["log_odds_chosen"] = jnp.mean(jax.lax.stop_gradient(log_odds))
    return -beta * log_odds_ratio, metrics


KTO_LOSSES = ("kto", "apo_zero_unpaired")


def kto_loss(
    logps: Array,
    ref_logps: Array,
    desirable: Array,
    *,
    beta: float = 0.1,
    kl_logps: Array | None = None,
    kl_ref_logps: Array | None = None,
    kl_reference_point: float | Array | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Array, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples.

    With r = log π(y|x) - log π_ref(y|x) and the reference point z0 = max(0, mean KL estimate),
    the loss is λ_D (1 - σ(β (r - z0))) for desirable and λ_U (1 - σ(β (z0 - r))) for undesirable
    examples. z0 is estimated as in TRL from mismatched (x, y') pairs, mean(kl_logps - kl_ref_logps)
    over the batch, clamped at 0 and without gradient; or given as `kl_reference_point`.
    `apo_zero_unpaired` (APO-zero, D'Oosterlinck et al. 2024) uses 1 - σ(β r) and σ(β r) instead.

    Args:
      logps, ref_logps: [B] summed completion log-probs under policy and reference.
      desirable: [B] bool labels.
      kl_logps, kl_ref_logps: [B] log-probs of mismatched completions (the KL batch).
    Returns:
      losses [B] and metrics rewards/chosen, rewards/rejected, rewards/margins (means over the
      desirable / undesirable examples; 0 when a side is absent) and kl (= z0).
    """
    chex.assert_rank([logps, ref_logps, desirable], 1)
    chex.assert_equal_shape([logps, ref_logps, desirable])
    chex.assert_type(desirable, bool)
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSSES}")
    logratios = logps - ref_logps
    if loss_type == "kto":
        if kl_reference_point is None:
            if kl_logps is None or kl_ref_logps is None:
                raise ValueError("kto needs kl_logps and kl_ref_logps, or kl_reference_point")
            chex.assert_equal_shape([kl_logps, kl_ref_logps])
            kl_reference_point = jnp.maximum(jnp.mean(kl_logps - kl_ref_logps), 0.0)
        z0 = jax.lax.stop_gradient(jnp.asarray(kl_reference_point, jnp.float32))
        desirable_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - z0))
        undesirable_losses = 1.0 - jax.nn.sigmoid(beta * (z0 - logratios))
    else:
        z0 = jnp.zeros((), jnp.float32)
        desirable_losses = 1.0 - jax.nn.sigmoid(beta * logratios)
        undesirable_losses = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(
        desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses
    )
    rewards = jax.lax.stop_gradient(beta * logratios)
    chosen_reward = ops.masked_mean(rewards, desirable)
    rejected_reward = ops.masked_mean(rewards, ~desirable)
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "kl": z0,
    }
    return losses, metrics


def kto_desirable_weight(num_desirable: int, num_undesirable: int, *, target: float = 1.0) -> float:
    """λ_D for imbalanced data with λ_U = 1, from KTO §4.3: λ_D n_D / (λ_U n_U) ∈ [1, 4/3].

    Returns target · n_U / n_D; `target` must lie in the paper's recommended range [1, 4/3].
    """
    if not 1.0 <= target <= 4.0 / 3.0:
        raise ValueError(f"target ratio must be in [1, 4/3] (KTO §4.3), got {target}")
    if num_desirable <= 0 or num_undesirable <= 0:
        raise ValueError("both classes need at least one example")
    return target * num_undesirable / num_desirable
