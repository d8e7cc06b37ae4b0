"""experiments/dapo_ladder.py: the smoke run writes its results, and the check can fail."""

import numpy as np

from experiments import dapo_ladder
from experiments.report import machine


def _fake(entropies_by_rung, zero_std=(0.0, 0.0), filled=(True, True)):
    results = {"SFT": [{"accuracy (greedy)": 0.5, "accuracy (T=1)": 0.4}]}
    for rung in dapo_ladder.RUNGS:
        results[rung] = [{"entropy": list(e), "frac_reward_zero_std": list(zero_std),
                          "filled": list(filled),
                          "clipped (low, high)": [(0.01, 0.0)] * len(e),
                          "accuracy (greedy)": 0.5, "accuracy (T=1)": 0.4, "seconds": 1.0}
                         for e in entropies_by_rung.get(rung, [(0.1, 0.1), (0.1, 0.1)])]
    return results


def test_check_flags_each_claim():
    assert dapo_ladder.check(_fake({})) == []
    lower = _fake({"GRPO": [(0.2, 0.2), (0.21, 0.2)], "+ clip-higher": [(0.1, 0.1), (0.1, 0.11)]})
    assert "entropy" in dapo_ladder.check(lower)[0]
    leaky = _fake({}, zero_std=(0.0, 0.25))
    assert "rollouts [2]" in dapo_ladder.check(leaky)[0]
    # rounds ran out
    assert dapo_ladder.check(_fake({}, zero_std=(0.0, 0.25), filled=(True, False))) == []


def test_rungs_are_cumulative():
    assert dapo_ladder.rung_overrides("GRPO") == []
    last = dapo_ladder.rung_overrides("+ dynamic sampling")
    assert (last[0] == "rl.epsilon_high=0.28" and last[-1] == "rl.dynamic_sampling=true"
            and len(last) == 5)


def test_smoke_run_writes_results(tmp_path):
    dapo_ladder.main(["--smoke", "--out", str(tmp_path / "results"),
                      "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "dapo_ladder.md").read_text()
    assert report.count("\n| +") == 4 and "**Check.**" in report
    assert f" min on {machine()}." in report  # e.g. "CPU (AMD EPYC, 2 cores)"
    assert (tmp_path / "results" / "dapo_ladder.png").stat().st_size > 10_000
    table_rows = [line for line in report.splitlines() if line.startswith("| GRPO")]
    accuracy = float(table_rows[0].split("|")[2].split("±")[0])
    assert 0.0 <= accuracy <= 1.0 and np.isfinite(accuracy)
