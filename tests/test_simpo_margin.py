"""experiments/simpo_margin.py: SimPO's target margin γ on a tabular policy, through the library's
own simpo_loss."""

import jax.numpy as jnp
import numpy as np

from experiments import simpo_margin as margin


def test_measures_rank_against_the_true_rewards():
    rewards = jnp.array([0.0, 1.0, 2.0, 3.0])
    chosen = jnp.array([3, 3, 1])
    ordered = margin.measures(rewards, rewards, chosen)
    np.testing.assert_allclose(ordered[0], 1.0)
    log_pi = np.asarray(rewards) - np.log(np.exp(np.asarray(rewards)).sum())
    np.testing.assert_allclose(ordered[1], log_pi[[3, 3, 1]].mean(), rtol=1e-6)
    np.testing.assert_allclose(margin.measures(-rewards, rewards, chosen)[0], 0.0)
    # one pair of the six swapped
    np.testing.assert_allclose(margin.measures(jnp.array([1.0, 0.0, 2.0, 3.0]), rewards,
                                               chosen)[0], 5 / 6)


def test_pairs_are_labelled_by_bradley_terry():
    rewards, chosen, rejected = margin.preference_pairs(__import__("jax").random.key(0), 8,
                                                        20_000)
    gap = np.asarray(rewards[chosen] - rewards[rejected])
    distinct = gap != 0
    # P(chosen is the better one | |Δ|) = σ(|Δ|): the mean of σ(|Δ|) over the distinct pairs
    expected = np.mean(1 / (1 + np.exp(-np.abs(gap[distinct]))))
    assert abs(np.mean(gap[distinct] > 0) - expected) < 0.01


def test_the_margin_keeps_the_ranking_and_costs_likelihood():
    values = margin.run(seeds=4, steps=2000)
    assert margin.check(values) == []
    chosen = [values[g][:, -1, 1].mean() for g in margin.GAMMAS]
    assert chosen[0] - chosen[-1] > 0.2  # measured 0.36 nats between γ = 0 and γ = 2


def test_check_flags_each_way_the_claim_can_fail():
    flat = np.zeros((4, 3, 2)) + np.array([0.8, -4.0])
    flat[:, :, 0] += np.array([[0.0], [0.01], [-0.01], [0.0]])
    falling = {g: flat + np.array([0.0, -g]) for g in (0.0, 1.0, 2.0)}
    assert margin.check(falling) == []
    rising = {g: flat + np.array([0.05 * g, -g]) for g in (0.0, 1.0, 2.0)}
    assert "changes the ranking accuracy by +0.1000" in margin.check(rising)[0]
    same = {g: flat for g in (0.0, 1.0, 2.0)}
    assert "does not fall as γ grows" in margin.check(same)[0]
