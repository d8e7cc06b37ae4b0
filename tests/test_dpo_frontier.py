"""experiments/dpo_frontier.py: the oracle against exact tilting, its invariances, the pairs, the
check, and the smoke run."""

import numpy as np

from experiments import dpo_frontier as exp


def exact_tilt(values, probs, beta):
    """E_π*[r] and KL(π* ‖ q) of π* ∝ q · exp(r / β) on a finite support."""
    p = probs * np.exp(values / beta)
    p /= p.sum()
    return float(np.sum(p * values)), float(np.sum(p * np.log(p / probs)))


def test_oracle_equals_exact_tilting_when_the_samples_are_the_distribution():
    """M samples laid out in exact proportion to q: self-normalised weighting is exact tilting of
    q."""
    values, counts = np.array([-2.0, -0.5, 0.0, 1.0, 3.0]), np.array([5, 30, 40, 20, 5])
    # 2 openings, M = 100
    rewards = np.stack([np.repeat(values, counts), np.repeat(values + 1.0, counts)])
    betas = np.array([0.2, 0.7, 2.0, 10.0])
    out = exp.oracle(rewards, betas)
    for k, beta in enumerate(betas):
        reward, kl = exact_tilt(values, counts / counts.sum(), beta)
        np.testing.assert_allclose(out["reward"][:, k], [reward, reward + 1.0], rtol=1e-10)
        # a shift leaves the KL
        np.testing.assert_allclose(out["kl"][:, k], [kl, kl], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["reference_reward"],
                               [values @ counts / 100, values @ counts / 100 + 1])
    assert np.all(np.diff(out["kl"], axis=1) < 0) and np.all(np.diff(out["reward"], axis=1) < 0)
    # β → ∞: π_ref itself
    np.testing.assert_allclose(exp.oracle(rewards, [1e6])["ess"], 100, rtol=1e-4)


def test_oracle_at_small_beta_is_best_of_m_and_untrusted():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 64))
    out = exp.oracle(rewards, [1e-3])
    np.testing.assert_allclose(out["reward"][:, 0], rewards.max(1))
    np.testing.assert_allclose(out["kl"][:, 0], np.log(64), rtol=1e-6)
    _, _, kl_max = exp.oracle_curve(exp.oracle(rewards), 64)
    assert 0 < kl_max < np.log(64 / 4)  # at ESS ≥ M / 16, well inside log M


def test_preference_pairs_take_every_two_samples_with_different_rewards():
    texts = [" good", " bad", " good", "", " fine", " meh", " ok", " so"]
    rewards = np.array([[2.0, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    pairs = exp.preference_pairs(["a", "b"], texts, rewards)
    assert sorted(zip(pairs["chosen"], pairs["rejected"])) == [(" good", " bad"), (" good", " bad")]


def _point(method, value, kl, reward, P=32, S=8):
    rng = np.random.default_rng(int(kl * 100))
    return {"method": method, "beta" if method == "DPO" else "target": value, "kl": kl,
            "reward": reward, "kl_PxS": kl + 0.1 * rng.normal(size=(P, S)),
            "reward_PxS": reward + 0.1 * rng.normal(size=(P, S))}


def test_check_flags_points_above_the_oracle_and_a_non_monotone_dpo_sweep():
    rng = np.random.default_rng(1)
    per_prompt = exp.oracle(rng.normal(size=(32, 512)))
    kl, reward, kl_max = exp.oracle_curve(per_prompt, 512)
    at = lambda x: float(np.interp(x, kl, reward))  # noqa: E731
    points = {"DPO β 1": _point("DPO", 1.0, 0.5, at(0.5) - 0.2),
              "DPO β 0.1": _point("DPO", 0.1, 1.5, at(1.5) - 0.1),
              "PPO": _point("PPO", 4.0, 1.0, at(1.0) - 0.3)}
    gap = exp.gaps(points, per_prompt, 512)
    assert exp.check(points, gap) == []
    assert all(g["trusted"] and 0 < g["se"] < 0.1 for g in gap.values())
    ppo = points["PPO"]
    np.testing.assert_allclose(gap["PPO"]["gap"],
                               ppo["reward_PxS"].mean() - at(ppo["kl_PxS"].mean()))

    points["PPO"] = _point("PPO", 4.0, 1.0, at(1.0) + 0.5)
    gap = exp.gaps(points, per_prompt, 512)
    failures = exp.check(points, gap)
    assert (len(failures) == 1 and failures[0].startswith("PPO lies")
            and abs(gap["PPO"]["gap"] - 0.5) < 0.05)

    points["DPO β 0.1"] = _point("DPO", 0.1, 0.4, at(0.4) - 0.1)
    assert "DPO's KL does not rise as β falls" in exp.check(points,
                                                             exp.gaps(points, per_prompt, 512))[-1]

    # far beyond the trusted range: not checked
    far = {"DPO β 1": _point("DPO", 1.0, kl_max + 1, 10.0)}
    gap = exp.gaps(far, per_prompt, 512)
    assert not gap["DPO β 1"]["trusted"]
    assert exp.check(far, gap) == ["no point lies inside the oracle's trusted KL range: the "
                                   "frontier check is empty"]


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "dpo_frontier.md").read_text()
    assert all(f"| {name} |" in report
               for name in ["π_ref (SFT)", "DPO β 0.1", "DPO β 1", "PPO KL target 4"])
    assert "**Check.**" in report
    assert (tmp_path / "results" / "dpo_frontier.png").stat().st_size > 10_000
