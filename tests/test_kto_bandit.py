"""experiments/kto_bandit.py: KTO on imbalanced data on a log-linear policy, through the library's
own kto_loss and dpo_loss."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kto_bandit as bandit


def test_the_shared_feature_moves_every_in_data_response_together():
    params = {"b": jnp.zeros(6), "w": jnp.asarray(np.log(2.0))}
    np.testing.assert_allclose(jnp.exp(bandit.log_policy(params, 2)),
                               [2 / 8, 2 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8], rtol=1e-6)


def test_pairs_prefer_the_higher_reward_of_two_distinct_responses():
    rewards_N = jax.random.normal(jax.random.key(1), (5,))
    chosen, rejected = bandit._pairs(jax.random.key(0), 5, 256, rewards_N)
    assert np.all(chosen != rejected) and np.all(rewards_N[chosen] > rewards_N[rejected])


def test_imbalanced_kto_leaves_the_data_unless_desirable_examples_are_rescaled():
    values = bandit.run(seeds=4, steps=1000)
    gain = {m: (x[:, -1] - x[:, 0]).mean() for m, x in values.items()}
    assert abs(gain["KTO, 10% desirable, λ_D = 1"]) < 0.1  # measured -0.03
    assert gain["KTO, 10% desirable, λ_D rescaled"] > 0.3  # measured 0.49
    assert gain["KTO"] > 0.8 * gain["DPO"]  # measured 1.29 and 1.32


def test_check_flags_each_way_the_claim_can_fail():
    def values(one, rescaled):
        start = np.zeros((4, 1))
        spread = np.array([[0.0], [0.01], [-0.01], [0.02]])
        return {"DPO": np.hstack([start, 1.0 + spread]), "KTO": np.hstack([start, 1.0 + spread]),
                "KTO, 10% desirable, λ_D = 1": np.hstack([start, one + spread]),
                "KTO, 10% desirable, λ_D rescaled": np.hstack([start, rescaled + spread])}

    assert bandit.check(values(0.0, 0.9)) == []
    failures = bandit.check(values(0.9, 0.0))
    assert len(failures) == 3 and "over 2 standard errors" in failures[0]
    assert "less than 80%" in failures[1] and "a quarter" in failures[2]
