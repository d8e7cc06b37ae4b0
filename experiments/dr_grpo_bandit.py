"""The mechanism behind GRPO's length bias (Liu et al. 2025, §3.1) on a tabular policy, where the
answer is known: the library's own advantage, policy-loss and aggregation functions train a
policy over (answer, filler length) and nothing else.

A completion is `prefix` fixed tokens, an answer (right with fixed probability `accuracy`, the
task's difficulty, not trained), `k` ∈ {0 … K} filler tokens and a stop token. After answer a,
each filler position j stops with probability σ(h[a, j]): the trained table h [2, K] is a hazard
per answer, so the policy can make wrong answers longer than right ones. It starts with every
length equally likely for both answers. The reward is 1 for a right answer, and length never
changes it, so the policy gradient of E[reward] leaves h where it is in expectation:

  sequence_mean (GRPO): each token weighs A/|o|, so the update follows A · ∇E[1/|o|]: for a wrong
    answer (A < 0) it lowers E[1/|o|], i.e. lengthens; for a right one it shortens;
  token_sum_over_max_len (Dr. GRPO): each token weighs A/T_max, the unbiased policy gradient.

`run` trains each aggregation for `updates` on-policy updates of `groups` × G samples, `seeds`
seeds as lanes of one vmapped program, and returns the gap between the exact expected lengths of
wrong and right answers under h, before the first update and after each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from experiments import report, tabular

METHODS = {"GRPO": ("group", "sequence_mean"), "Dr. GRPO": ("none", "token_sum_over_max_len")}


def _uniform_hazards(K: int) -> jax.Array:
    """h [2, K] under which every k ∈ {0 … K} has probability 1/(K+1): stop at j w.p. 1/(K+1-j)."""
    stop_K = 1.0 / (K + 1 - jnp.arange(K))
    return jnp.tile(jnp.log(stop_K) - jnp.log1p(-stop_K), (2, 1))


def length_distribution(h_AxK: jax.Array) -> jax.Array:
    """P(k | a) [2, K+1]: stop at k after continuing at 0 … k-1 (k = K: never stopped)."""
    log_stop, log_go = jax.nn.log_sigmoid(h_AxK), jax.nn.log_sigmoid(-h_AxK)
    survive = jnp.concatenate([jnp.zeros((2, 1)), jnp.cumsum(log_go, axis=1)], axis=1)
    return jnp.exp(survive + jnp.concatenate([log_stop, jnp.zeros((2, 1))], axis=1))


def expected_lengths(h_AxK: jax.Array, prefix: int) -> jax.Array:
    """E[|o| | wrong], E[|o| | right]: prefix + answer + k fillers + the stop token."""
    K = h_AxK.shape[1]
    return length_distribution(h_AxK) @ (prefix + 2.0 + jnp.arange(K + 1))


def _rollout(key, h_AxK, *, groups, G, accuracy, prefix):
    """Sample groups × G completions; return their token log-probs [B, T] (0 for the prefix, the
    answer and a forced stop: they carry no parameter), mask [B, T] and rewards [B]."""
    K = h_AxK.shape[1]
    key_answer, key_length = jax.random.split(key)
    right_B = jax.random.bernoulli(key_answer, accuracy, (groups * G,)).astype(jnp.int32)
    k_B = jax.random.categorical(key_length, jnp.log(length_distribution(h_AxK)[right_B]))
    j_K = jnp.arange(K)
    h_BxK = h_AxK[right_B]
    # decision j at position prefix + 1 + j: go on (j < k) or stop (j = k); k = K stops for sure
    decisions_BxK = jnp.where(j_K < k_B[:, None], jax.nn.log_sigmoid(-h_BxK),
                              jnp.where(j_K == k_B[:, None], jax.nn.log_sigmoid(h_BxK), 0.0))
    T = prefix + 2 + K
    logps_BxT = jnp.zeros((groups * G, T)).at[:, prefix + 1:prefix + 1 + K].set(decisions_BxK)
    mask_BxT = jnp.arange(T) < (prefix + 2 + k_B)[:, None]
    return logps_BxT, mask_BxT, right_B.astype(jnp.float32)


def train(key, *, method: str, updates: int, groups: int, G: int, accuracy: float, prefix: int,
          K: int, lr: float) -> jax.Array:
    """Adam on h for `updates` on-policy updates; returns E[|o| | wrong] − E[|o| | right] before
    the first update and after each [updates + 1]."""
    scale, aggregation = METHODS[method]

    def objective(h_AxK, sample_key):
        logps_BxT, mask_BxT, rewards_B = _rollout(sample_key, h_AxK, groups=groups, G=G,
                                                  accuracy=accuracy, prefix=prefix)
        advantages_B, _ = losses.group_advantages(rewards_B, G, scale=scale)
        per_token, _ = losses.policy_loss(logps_BxT, logps_BxT, advantages_B, mask_BxT)
        numerator, denominator = losses.aggregate_loss(per_token, mask_BxT, aggregation)
        return numerator / denominator

    def gap(h_AxK):
        wrong, right = expected_lengths(h_AxK, prefix)
        return wrong - right

    return tabular.adam_trajectory(jax.grad(objective), _uniform_hazards(K), gap, key,
                                   steps=updates, lr=lr)


def run(*, seeds: int = 16, updates: int = 1000, groups: int = 32, G: int = 8,
        accuracy: float = 0.25, prefix: int = 12, K: int = 12, lr: float = 1e-2) -> dict:
    """{method: gap [seeds, updates + 1]}: E[|o| | wrong] − E[|o| | right] before the first
    update and after each."""
    return {method: tabular.over_seeds(lambda key, method=method: train(
        key, method=method, updates=updates, groups=groups, G=G, accuracy=accuracy,
        prefix=prefix, K=K, lr=lr), seeds) for method in METHODS}


def check(gaps: dict) -> list[str]:
    """The mechanism's claim; an empty list when it holds: after the last update GRPO's gap is
    more than 2 tokens and 5 standard errors (over seeds) above 0, and Dr. GRPO's within 2 standard
    errors of 0 and below a tenth of GRPO's."""
    (g, g_se), (d, d_se) = (report.mean_and_se(gaps[m][:, -1]) for m in METHODS)
    failures = []
    if not (g > 2.0 and g > 5 * g_se):
        failures.append(f"tabular policy: under GRPO the gap is {g:+.2f} ± {g_se:.2f} tokens, "
                        "not above 2 tokens and 5 standard errors")
    if not (abs(d) <= 2 * d_se and abs(d) < 0.1 * abs(g)):
        failures.append(f"tabular policy: under Dr. GRPO the gap is {d:+.2f} ± {d_se:.2f} tokens, "
                        "not within 2 standard errors of 0 and a tenth of GRPO's")
    return failures


def table(gaps: dict, at: tuple[int, ...] = (100, 300, 1000)) -> str:
    """Gap (wrong − right, tokens) after each of `at` updates, mean ± SE over seeds."""
    return report.trajectory_table(gaps, at, first="aggregation", digits=2,
                                   column=lambda u: f"after {u} updates")
