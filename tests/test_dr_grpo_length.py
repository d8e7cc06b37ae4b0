"""experiments/dr_grpo_length.py: the smoke run writes its results, and the check can fail."""

import numpy as np

from experiments import dr_grpo_length as exp


def _sample(right, wrong):
    return {"right": np.asarray(right, float), "wrong": np.asarray(wrong, float), "accuracy": 0.5,
            "seconds": 1.0}


def test_gap_and_its_standard_error_follow_the_formula():
    sample = _sample([10, 12, 14], [20, 22])
    g, se = exp.gap(sample)
    assert g == 21 - 12
    np.testing.assert_allclose(se, np.sqrt(4 / 3 + 2 / 2))


def test_check_flags_each_way_the_claim_can_fail():
    sft = _sample([10, 11] * 50, [10, 11] * 50)
    grows, flat = _sample([10, 11] * 50, [14, 15] * 50), _sample([10, 11] * 50, [10, 11] * 50)
    assert exp.check({"SFT": sft, "GRPO": [grows], "Dr. GRPO": [flat]}) == []
    failures = exp.check({"SFT": sft, "GRPO": [flat], "Dr. GRPO": [grows]})
    assert len(failures) == 3 and "under GRPO" in failures[0] and "Dr. GRPO" in failures[2]


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "dr_grpo_length.md").read_text()
    assert "| SFT |" in report and "| Dr. GRPO |" in report and "**Check.**" in report
    assert (tmp_path / "results" / "dr_grpo_length.png").stat().st_size > 10_000
