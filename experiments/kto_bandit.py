"""The mechanism behind KTO on imbalanced data (Ethayarajh et al. 2024, §4.3) on a log-linear
policy, where the answer is known: the library's own `kto_loss` and `dpo_loss` train it over N
responses that the data contains and M that it never does, as a language model's outputs include
text unlike any example.

π(y) ∝ exp(b_y + w·s_y), with s_y = 1 for the N in-data responses (their rewards standard normal
draws) and 0 for the M others (reward 0): b is one logit per response, w a feature every in-data
response shares, so pushing one in-data response down pushes all of them down a little, the way a
network's shared weights generalise. The reference is uniform. Each step draws 16 pairs of
in-data responses from it and prefers the higher-reward response of each:
  - DPO on the pairs;
  - KTO on the same pairs unpaired (chosen desirable, rejected undesirable), λ_D = λ_U = 1, with
    the reference point z0 from the batch's mismatched responses, as TRL's;
  - KTO with 90% of the desirable examples dropped (each kept with probability 0.1), with λ_D = 1
    and with the paper's rescaling λ_D n_D / (λ_U n_U) = 1 (λ_D = 10).
With λ_D n_D ≪ λ_U n_U the undesirable examples push the shared feature down, and mass leaves the
data for the responses no example covers. After each step the exact expected true reward E_π[r]
is recorded; a run's gain is its last value minus the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from experiments import report, tabular

RUNS = {  # name: (kept fraction of desirable examples, λ_D)
    "KTO": (1.0, 1.0),
    "KTO, 10% desirable, λ_D = 1": (0.1, 1.0),
    "KTO, 10% desirable, λ_D rescaled": (0.1, 10.0),
}


def _pairs(key, N: int, pairs: int, rewards_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`pairs` pairs of distinct in-data responses drawn uniformly: (chosen, rejected)."""
    a, b = jax.random.choice(key, N, (2, pairs))
    b = jnp.where(a == b, (b + 1) % N, b)
    better = rewards_N[a] > rewards_N[b]
    return jnp.where(better, a, b), jnp.where(better, b, a)


def log_policy(params: dict, N: int) -> jax.Array:
    """log π [N + M]: the N in-data responses first."""
    seen = jnp.arange(params["b"].shape[0]) < N
    return jax.nn.log_softmax(params["b"] + params["w"] * seen)


def step_loss(params, key, rewards_N, *, method: str, pairs: int, beta: float) -> jax.Array:
    """The batch's mean loss (KTO: over the examples kept)."""
    N = rewards_N.shape[0]
    key_pairs, key_keep, key_kl = jax.random.split(key, 3)
    chosen, rejected = _pairs(key_pairs, N, pairs, rewards_N)
    log_pi = log_policy(params, N)
    logratio_N = log_pi - jnp.log(1.0 / log_pi.shape[0])  # log π/π_ref (all N + M)
    if method == "DPO":
        per_pair, _ = losses.dpo_loss(logratio_N[chosen], logratio_N[rejected],
                                      jnp.zeros(pairs), jnp.zeros(pairs), beta=beta)
        return jnp.mean(per_pair)
    kept_fraction, desirable_weight = RUNS[method]
    ids = jnp.concatenate([chosen, rejected])
    desirable = jnp.arange(2 * pairs) < pairs
    kept = ~desirable | jax.random.bernoulli(key_keep, kept_fraction, (2 * pairs,))
    mismatched = jax.random.permutation(key_kl, ids)  # TRL pairs each prompt with another's answer
    per_example, _ = losses.kto_loss(logratio_N[ids], jnp.zeros(2 * pairs), desirable, beta=beta,
                                     kl_logps=jnp.where(kept, logratio_N[mismatched], 0.0),
                                     kl_ref_logps=jnp.zeros(2 * pairs),
                                     desirable_weight=desirable_weight)
    return jnp.sum(jnp.where(kept, per_example, 0.0)) / jnp.sum(kept)


def train(key, *, method: str, steps: int, N: int, M: int, pairs: int, beta: float, lr: float):
    """Adam from the reference for `steps` steps; E_π[r] before the first and after each."""
    key_rewards, key_steps = jax.random.split(key)
    rewards_N = jax.random.normal(key_rewards, (N,))
    rewards = jnp.concatenate([rewards_N, jnp.zeros(M)])
    grad = jax.grad(lambda p, k: step_loss(p, k, rewards_N, method=method, pairs=pairs, beta=beta))
    return tabular.adam_trajectory(grad, {"b": jnp.zeros(N + M), "w": jnp.zeros(())},
                                   lambda p: jnp.exp(log_policy(p, N)) @ rewards, key_steps,
                                   steps=steps, lr=lr)


def run(*, seeds: int = 16, steps: int = 3000, N: int = 32, M: int = 32, pairs: int = 16,
        beta: float = 0.1, lr: float = 1e-2) -> dict:
    """{method: E_π[r] [seeds, steps + 1]}; seed k draws its own rewards and pairs."""
    return {method: tabular.over_seeds(lambda key, method=method: train(
        key, method=method, steps=steps, N=N, M=M, pairs=pairs, beta=beta, lr=lr), seeds)
        for method in ("DPO", *RUNS)}


def check(values: dict) -> list[str]:
    """The mechanism's claims; an empty list when they hold: by the last step, with 10% of the
    desirable examples the rescaled λ_D gains more than λ_D = 1 by over 2 standard errors and at
    least 80% of the balanced KTO's gain, while λ_D = 1 gains less than a quarter of it."""
    gain = {m: x[:, -1] - x[:, 0] for m, x in values.items()}
    balanced, one, rescaled = (report.mean_and_se(gain[m]) for m in RUNS)
    diff, diff_se = report.mean_and_se(gain["KTO, 10% desirable, λ_D rescaled"]
                                       - gain["KTO, 10% desirable, λ_D = 1"])
    failures = []
    if not diff > 2 * diff_se:
        failures.append(f"tabular policy: with 10% desirable, the rescaled λ_D gains {diff:+.3f} "
                        f"± {diff_se:.3f} more than λ_D = 1, not over 2 standard errors")
    if not rescaled[0] >= 0.8 * balanced[0]:
        failures.append(f"tabular policy: the rescaled λ_D gains {rescaled[0]:.3f}, less than 80% "
                        f"of balanced KTO's {balanced[0]:.3f}")
    if not one[0] < 0.25 * balanced[0]:
        failures.append(f"tabular policy: λ_D = 1 gains {one[0]:.3f}, not less than a quarter of "
                        f"balanced KTO's {balanced[0]:.3f}")
    return failures


def table(values: dict, at: tuple[int, ...] = (300, 1000, 3000)) -> str:
    """Gain in E_π[r] after each of `at` steps, mean ± SE over seeds."""
    return report.trajectory_table(values, at, first="loss", relative=True,
                                   column=lambda s: f"gain after {s} steps")


def fraction_of_dpo(values: dict, at: tuple[int, ...] = (300, 1000, 3000),
                    threshold: float = 0.8) -> str:
    """Balanced KTO's mean gain as a fraction of DPO's after each of `at` steps, as a sentence."""
    gain = {m: (values[m] - values[m][:, :1]).mean(axis=0) for m in ("DPO", "KTO")}
    at = [s for s in at if s < len(gain["DPO"])]
    fractions = [gain["KTO"][s] / gain["DPO"][s] for s in at]
    sentence = ("On the tabular policy, balanced KTO's gain is "
                + ", ".join(f"{f:.2f}" for f in fractions) + " of DPO's after "
                + ", ".join(map(str, at)) + " steps.")
    if fractions[-1] < threshold:
        sentence += (f" It ends below {threshold} there too, with the library's own losses: the "
                     "LM's KTO falling short of DPO is the objective's doing at this β, not the "
                     "code's.")
    return sentence
