"""The mechanism behind SimPO's target margin γ (Meng et al. 2024, eq. 6 and Fig. 3) on a tabular
policy, where the answer is known: the library's own `simpo_loss` trains a softmax over N
one-token responses on a fixed set of preference pairs, for each γ.

Responses have true rewards r ~ N(0, 1), and each training pair is labelled by Bradley-Terry on
them, P(a ≻ b) = σ(r_a − r_b), so some labels are wrong. SimPO's loss on a pair is
−log σ(β log π(y_w) − β log π(y_l) − γ) (one token each: the length normalisation is moot). At its
optimum, a pair labelled a ≻ b with probability p has a reward gap Δ solving
p σ(γ − Δ) = (1 − p) σ(γ + Δ), whose root has the sign of p − ½ for every γ: the margin spreads
the implicit rewards without reordering them. So γ should leave the ranking accuracy alone and
cost likelihood: a softmax spreads its logits by taking mass from most responses, chosen ones
among them.

Measured after each step: the ranking accuracy of the implicit reward β log π over all C(N, 2)
pairs of responses against the true order (most of them never compared in training), and the mean
log π of the training pairs' chosen responses. Seeds are lanes of one vmapped program, each with
its own rewards and pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from experiments import report, tabular

GAMMAS = (0.0, 0.5, 1.0, 2.0)  # the LM study's sweep (experiments/simpo_ablations.py)


def preference_pairs(key, N: int, pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """True rewards r [N] and `pairs` (chosen, rejected) index pairs labelled by σ(r_a − r_b)."""
    key_r, key_ab, key_label = jax.random.split(key, 3)
    rewards_N = jax.random.normal(key_r, (N,))
    a, b = jax.random.randint(key_ab, (2, pairs), 0, N)
    a_wins = jax.random.bernoulli(key_label, jax.nn.sigmoid(rewards_N[a] - rewards_N[b]))
    return rewards_N, jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)


def measures(logits_N: jax.Array, rewards_N: jax.Array, chosen_P: jax.Array) -> jax.Array:
    """[ranking accuracy over all pairs of responses, mean log π of the chosen responses]."""
    log_pi_N = jax.nn.log_softmax(logits_N)
    i, j = jnp.triu_indices(logits_N.shape[0], 1)
    accuracy = jnp.mean((log_pi_N[i] > log_pi_N[j]) == (rewards_N[i] > rewards_N[j]))
    return jnp.stack([accuracy, jnp.mean(log_pi_N[chosen_P])])


def train(key, *, gamma: float, steps: int, N: int, pairs: int, batch: int, beta: float,
          lr: float) -> jax.Array:
    """Adam from uniform logits on batches drawn from one set of pairs; `measures` before the
    first step and after each [steps + 1, 2]."""
    key_data, key_train = jax.random.split(key)
    rewards_N, chosen_P, rejected_P = preference_pairs(key_data, N, pairs)
    ones_B = jnp.ones(batch)

    def loss(logits_N, key):
        rows = jax.random.randint(key, (batch,), 0, pairs)
        log_pi_N = jax.nn.log_softmax(logits_N)
        per_pair, _ = losses.simpo_loss(log_pi_N[chosen_P[rows]], log_pi_N[rejected_P[rows]],
                                        ones_B, ones_B, beta=beta, gamma=gamma)
        return jnp.mean(per_pair)

    return tabular.adam_trajectory(jax.grad(loss), jnp.zeros(N),
                                   lambda p: measures(p, rewards_N, chosen_P), key_train,
                                   steps=steps, lr=lr)


def run(*, seeds: int = 16, steps: int = 2000, N: int = 64, pairs: int = 512, batch: int = 32,
        beta: float = 2.0, gammas=GAMMAS, lr: float = 1e-2) -> dict:
    """{γ: [seeds, steps + 1, 2]} (accuracy, chosen log π), every γ on the same seeds' data."""
    return {gamma: tabular.over_seeds(lambda key, gamma=gamma: train(
        key, gamma=gamma, steps=steps, N=N, pairs=pairs, batch=batch, beta=beta, lr=lr), seeds)
        for gamma in gammas}


def check(values: dict) -> list[str]:
    """The mechanism's claims; an empty list when they hold: after the last step, the largest γ's
    ranking accuracy is within 2 standard errors (paired over seeds) of γ = 0's, and the chosen
    responses' mean log π falls at every step up in γ."""
    gammas = sorted(values)
    first, last = values[gammas[0]][:, -1], values[gammas[-1]][:, -1]
    diff, se = report.mean_and_se(last[:, 0] - first[:, 0])
    failures = []
    if not abs(diff) <= 2 * se:
        failures.append(f"tabular policy: γ = {gammas[-1]:g} changes the ranking accuracy by "
                        f"{diff:+.4f} ± {se:.4f} against γ = 0, more than 2 standard errors")
    chosen = [values[g][:, -1, 1].mean() for g in gammas]
    if not all(b < a for a, b in zip(chosen, chosen[1:])):
        failures.append("tabular policy: the chosen responses' log π does not fall as γ grows: "
                        + ", ".join(f"γ = {g:g} {c:.2f}" for g, c in zip(gammas, chosen)))
    return failures


def table(values: dict, at: tuple[int, ...] = (100, 300, 2000)) -> str:
    """Ranking accuracy after each of `at` steps and the chosen log π after the last, per γ."""
    steps = next(iter(values.values())).shape[1] - 1
    at = [s for s in at if s <= steps]
    lines = ["| γ | " + " | ".join(f"accuracy after {s} steps" for s in at)
             + f" | chosen log π after {steps} steps |", "|---|" + "---|" * (len(at) + 1)]
    for gamma, x in values.items():
        lines.append(f"| {gamma:g} | " + " | ".join(report.mean_se(x[:, s, 0]) for s in at)
                     + f" | {report.mean_se(x[:, -1, 1], 2)} |")
    return "\n".join(lines)
