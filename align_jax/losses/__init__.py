"""Pure loss math on arrays: preference (DPO family, SimPO, ORPO, KTO), reward, policy,
advantages."""

from align_jax.losses.advantages import SCALES, gae, group_advantages, rloo_advantages
from align_jax.losses.policy import (
    AGGREGATIONS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    aggregate_loss,
    policy_loss,
    truncated_importance_weights,
    value_loss,
)
from align_jax.losses.preference import (
    DPO_LOSSES,
    F_DIVERGENCES,
    KTO_LOSSES,
    dpo_loss,
    f_divergence_scores,
    kto_desirable_weight,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from align_jax.losses.reward import bradley_terry_loss

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSSES",
    "F_DIVERGENCES",
    "KTO_LOSSES",
    "POLICY_LOSSES",
    "RATIO_LEVELS",
    "SCALES",
    "aggregate_loss",
    "bradley_terry_loss",
    "dpo_loss",
    "f_divergence_scores",
    "gae",
    "group_advantages",
    "kto_desirable_weight",
    "kto_loss",
    "orpo_loss",
    "policy_loss",
    "rloo_advantages",
    "simpo_loss",
    "truncated_importance_weights",
    "value_loss",
]
