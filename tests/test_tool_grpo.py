"""experiments/tool_grpo.py: the calculator's advantage, the check, and the smoke run."""

import numpy as np

from experiments import tool_grpo as exp


def _result(calls, right):
    """Per-problem shares from trajectories [problems, samples] that called / were right."""
    calls, right = np.array(calls, float), np.array(right, float)
    return {"calls": calls.mean(1), "right": right.mean(1), "calls_each": calls.ravel(),
            "right_each": right.ravel()}


def test_call_advantage_compares_trajectories_with_a_call_to_those_without():
    gap, se = exp.call_advantage(_result([[1, 0], [1, 0], [0, 1]], [[1, 0], [0, 0], [0, 1]]))
    a, b = np.array([1.0, 0, 1]), np.array([0.0, 0, 0])  # right, with a call / without
    assert np.isclose(gap, a.mean() - b.mean())
    assert np.isclose(se, np.sqrt(a.var() / 3 + b.var() / 3))
    assert np.isnan(exp.call_advantage(_result([[1, 1]], [[1, 0]]))[0])


def test_check_needs_the_calculator_and_grpo_each_to_help_beyond_two_standard_errors():
    sft = _result([[1, 0], [0, 0], [1, 0], [0, 0]] * 4, [[1, 0], [0, 0], [1, 0], [0, 0]] * 4)
    grpo = _result([[1, 1]] * 16, [[1, 1], [1, 0]] * 8)
    assert exp.check({"SFT": sft, "GRPO": grpo}) == []
    failures = exp.check({"SFT": sft, "GRPO": sft})
    assert [f.split(" by ")[0] for f in failures] == [
        "GRPO changed the held-out tool-use rate at T = 1",
        "GRPO changed the held-out accuracy at T = 1"]
    useless = _result([[1, 0], [0, 1]] * 8, [[0, 0], [0, 0]] * 8)
    assert exp.check({"SFT": useless, "GRPO": grpo})[0].startswith("at SFT, trajectories with a "
                                                                    "call are right +0.000")


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    text = (tmp_path / "results" / "tool_grpo.md").read_text()
    assert "| SFT |" in text and "| GRPO |" in text and "**Check.**" in text
    assert (tmp_path / "results" / "tool_grpo.png").exists()
