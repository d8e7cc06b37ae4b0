"""experiments/dr_grpo_bandit.py: GRPO's length bias on a tabular policy, through the library's
own advantage, policy-loss and aggregation functions."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import dr_grpo_bandit as bandit


def test_the_initial_policy_draws_every_length_alike_and_expected_lengths_follow():
    P_AxK1 = bandit.length_distribution(bandit._uniform_hazards(12))
    np.testing.assert_allclose(P_AxK1, np.full((2, 13), 1 / 13), rtol=1e-5)
    np.testing.assert_allclose(bandit.expected_lengths(bandit._uniform_hazards(12), 10),
                               [10 + 2 + 6] * 2, rtol=1e-5)


def test_rollout_log_probs_are_the_sampled_lengths_probabilities():
    h_AxK = jnp.array([[0.3, -1.0, 2.0], [-0.5, 0.1, 0.0]])
    logps_BxT, mask_BxT, rewards_B = bandit._rollout(jax.random.key(0), h_AxK, groups=64, G=8,
                                                     accuracy=0.5, prefix=4)
    k_B = mask_BxT.sum(1) - 4 - 2
    P_AxK1 = bandit.length_distribution(h_AxK)
    expected = np.log(P_AxK1[rewards_B.astype(int), k_B])
    np.testing.assert_allclose(logps_BxT.sum(1), expected, rtol=1e-5)
    assert 0.4 < rewards_B.mean() < 0.6 and set(np.unique(k_B)) == {0, 1, 2, 3}


def test_grpo_lengthens_wrong_answers_and_dr_grpo_does_not():
    gaps = bandit.run(seeds=16, updates=300)
    assert bandit.check(gaps) == []
    assert gaps["GRPO"][:, -1].mean() > 3.0  # measured 6.9 tokens
    assert abs(gaps["Dr. GRPO"][:, -1].mean()) < 0.5  # measured -0.09 ± 0.07


def test_check_flags_each_way_the_claim_can_fail():
    flat, grows = np.zeros((4, 10)) + [[0.1], [-0.1], [0.05], [-0.05]], np.full((4, 10), 5.0)
    grows[:, -1] += [0.1, -0.1, 0.2, -0.2]
    assert bandit.check({"GRPO": grows, "Dr. GRPO": flat}) == []
    failures = bandit.check({"GRPO": flat, "Dr. GRPO": grows})
    assert len(failures) == 2 and "under GRPO" in failures[0] and "Dr. GRPO" in failures[1]
