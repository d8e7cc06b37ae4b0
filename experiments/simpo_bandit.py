"""The mechanism behind SimPO's length normalisation (Meng et al. 2024, §2.2 and Fig. 2) on a
tabular policy, where the answer is known: the library's own `simpo_loss` and `dpo_loss` train a
policy over (content, length) on pairs whose preference ignores length.

A response is a content token (good or bad, logits θ [2]), then k ∈ {0 … K} filler tokens and a
stop: filler position j stops with probability σ(h[j]), one hazard table h [K] for both contents.
It starts with both contents and every length equally likely. Each pair prefers the good content
to the bad one, and both lengths are drawn uniformly and independently, so length says nothing
about preference. What each reward does with length:

  SimPO w/o LN, r = β log π(y): a longer response has a lower summed log-probability, so pairs
    whose chosen response is the longer one are the violated ones and carry the gradient: the
    update raises the chosen's going-on decisions and lowers the rejected's early stop, i.e.
    lengthens;
  SimPO, r = β/|y| log π(y), and DPO, r = β log π(y)/π_ref(y): the length of a response does not
    set its reward before training, so neither kind of pair dominates.

`run` trains each loss for `steps` Adam steps of `pairs` pairs, `seeds` seeds as lanes of one
vmapped program, and returns the exact expected length E[k] after each step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from experiments import report, tabular

METHODS = ("SimPO", "SimPO w/o LN", "DPO")


def _init(K: int, V: int) -> dict:
    """θ = 0 (both contents alike), uniform words, and h with every k ∈ {0 … K} equally likely."""
    stop_K = 1.0 / (K + 1 - jnp.arange(K))
    return {"content": jnp.zeros(2), "words": jnp.zeros(V),
            "hazard": jnp.log(stop_K) - jnp.log1p(-stop_K)}


def _log_length(hazard_K: jax.Array) -> jax.Array:
    """log P(k) [K+1]: stop at k after going on at 0 … k-1 (k = K: never stopped)."""
    log_stop, log_go = jax.nn.log_sigmoid(hazard_K), jax.nn.log_sigmoid(-hazard_K)
    survive = jnp.concatenate([jnp.zeros(1), jnp.cumsum(log_go)])
    return survive + jnp.concatenate([log_stop, jnp.zeros(1)])


def expected_length(params: dict) -> jax.Array:
    """E[k] under the policy."""
    log_p = _log_length(params["hazard"])
    return jnp.exp(log_p) @ jnp.arange(log_p.shape[0], dtype=jnp.float32)


def sequence_logps(params: dict, content_B: jax.Array, words_BxK: jax.Array, k_B: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """log π(y) [B] and |y| [B] = content + k words + stop (the first k of words_BxK)."""
    word_logps_BxK = jax.nn.log_softmax(params["words"])[words_BxK]
    spoken_BxK = jnp.arange(words_BxK.shape[1]) < k_B[:, None]
    logps_B = (jax.nn.log_softmax(params["content"])[content_B]
               + jnp.sum(jnp.where(spoken_BxK, word_logps_BxK, 0.0), axis=1)
               + _log_length(params["hazard"])[k_B])
    return logps_B, (k_B + 2).astype(jnp.float32)


def pair_loss(params, reference, key, *, method: str, pairs: int, K: int, V: int, beta: float,
              gamma: float) -> jax.Array:
    """Mean loss over `pairs` fresh pairs: good content chosen, lengths uniform and independent,
    words uniform."""
    key_length, key_words = jax.random.split(key)
    k_w, k_l = jax.random.randint(key_length, (2, pairs), 0, K + 1)
    words_w, words_l = jax.random.randint(key_words, (2, pairs, K), 0, V)
    good, bad = jnp.ones(pairs, int), jnp.zeros(pairs, int)
    chosen, chosen_len = sequence_logps(params, good, words_w, k_w)
    rejected, rejected_len = sequence_logps(params, bad, words_l, k_l)
    if method == "DPO":
        ref_chosen, _ = sequence_logps(reference, good, words_w, k_w)
        ref_rejected, _ = sequence_logps(reference, bad, words_l, k_l)
        per_pair, _ = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    else:
        per_pair, _ = losses.simpo_loss(chosen, rejected, chosen_len, rejected_len, beta=beta,
                                        gamma=gamma, length_normalize=method == "SimPO")
    return jnp.mean(per_pair)


def train(key, *, method: str, steps: int, pairs: int, K: int, V: int, beta: float,
          gamma: float, lr: float) -> jax.Array:
    """Adam for `steps` steps; E[k] before the first and after each [steps + 1]."""
    reference = _init(K, V)
    grad = jax.grad(lambda p, k: pair_loss(p, reference, k, method=method, pairs=pairs, K=K, V=V,
                                           beta=beta, gamma=gamma))
    return tabular.adam_trajectory(grad, reference, expected_length, key, steps=steps, lr=lr)


BETAS = {"SimPO": 2.0, "SimPO w/o LN": 2.0, "DPO": 0.1}  # the LM study's (configs/simpo_sentiment)


def run(*, seeds: int = 16, steps: int = 300, pairs: int = 16, K: int = 24, V: int = 16,
        gamma: float = 1.0, lr: float = 1e-2) -> dict:
    """{method: E[k] [seeds, steps + 1]}, before the first step and after each."""
    return {method: tabular.over_seeds(lambda key, method=method: train(
        key, method=method, steps=steps, pairs=pairs, K=K, V=V, beta=BETAS[method], gamma=gamma,
        lr=lr), seeds) for method in METHODS}


def check(lengths: dict) -> list[str]:
    """The mechanism's claim; an empty list when it holds: after the last step, E[k] has grown by
    more than 2 tokens and 5 standard errors (over seeds) without LN, and by more than three
    times as much as under SimPO or DPO."""
    growth = {m: report.mean_and_se(x[:, -1] - x[:, 0]) for m, x in lengths.items()}
    g, se = growth["SimPO w/o LN"]
    failures = []
    if not (g > 2.0 and g > 5 * se):
        failures.append(f"tabular policy: without LN E[k] grew by {g:+.2f} ± {se:.2f} tokens, not "
                        "more than 2 tokens and 5 standard errors")
    for other in ("SimPO", "DPO"):
        if not g > 3 * abs(growth[other][0]):
            failures.append(f"tabular policy: without LN E[k] grew by {g:+.2f} tokens, not three "
                            f"times {other}'s {growth[other][0]:+.2f}")
    return failures


def table(lengths: dict, at: tuple[int, ...] = (30, 100, 300)) -> str:
    """E[k] before training and after each of `at` steps, mean ± SE over seeds."""
    return report.trajectory_table(
        lengths, (0, *at), first="loss", digits=2,
        column=lambda s: f"after {s} steps" if s else "E[k] at the start")
