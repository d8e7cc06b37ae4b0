"""experiments/simpo_bandit.py: SimPO's length normalisation on a tabular policy, through the
library's own simpo_loss and dpo_loss."""

import jax.numpy as jnp
import numpy as np

from experiments import simpo_bandit as bandit


def test_initial_policy_gives_every_length_and_word_alike():
    K, V = 6, 4
    params = bandit._init(K, V)
    np.testing.assert_allclose(bandit.expected_length(params), K / 2, rtol=1e-6)
    k_B = jnp.array([0, 3, 6])
    logps_B, lengths_B = bandit.sequence_logps(params, jnp.array([0, 1, 1]),
                                               jnp.zeros((3, K), int), k_B)
    np.testing.assert_allclose(logps_B, np.log(1 / 2) + np.log(1 / (K + 1)) + k_B * np.log(1 / V),
                               rtol=1e-5)
    np.testing.assert_array_equal(lengths_B, k_B + 2)


def test_without_length_normalisation_the_policy_lengthens():
    lengths = bandit.run(seeds=4, steps=100)
    assert bandit.check(lengths) == []
    growth = {m: (x[:, -1] - x[:, 0]).mean() for m, x in lengths.items()}
    assert growth["SimPO w/o LN"] > 1.5  # measured 2.40 tokens; SimPO 0.34, DPO -0.06


def test_check_flags_each_way_the_claim_can_fail():
    steady = np.full((4, 5), 12.0) + np.array([[0.0, 0.1, 0.0, -0.1, 0.1]])
    grows = steady + np.linspace(0, 4, 5)
    assert bandit.check({"SimPO": steady, "SimPO w/o LN": grows, "DPO": steady}) == []
    failures = bandit.check({"SimPO": grows, "SimPO w/o LN": steady, "DPO": steady})
    assert len(failures) == 3 and "not more than 2 tokens" in failures[0]
    assert "SimPO's +4.10" in failures[1] and "DPO's +0.10" in failures[2]
