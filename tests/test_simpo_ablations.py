"""experiments/simpo_ablations.py: the smoke run writes its results, and the check can fail."""

from experiments import simpo_ablations as exp


def _fake(accuracy_by_gamma=(0.6, 0.7, 0.8, 0.9), lengths=(20.0, 30.0, 22.0), rhos=(0.3, 0.8, 0.4)):
    results = {"SFT": [{"length": 20.0, "truncated": 0.0, "reward": 0.0, "rho": 0.1}]}
    for g, accuracy in zip(exp.GAMMAS, accuracy_by_gamma):
        results[f"SimPO (γ = {g:g})"] = [{"reward accuracy": accuracy, "length": 20.0,
                                          "truncated": 0.0, "reward": 1.0, "rho": 0.3,
                                          "seconds": 1.0}] * 2
    for name, length, rho in zip(exp.MAIN, lengths, rhos):
        results.setdefault(name, [{"reward accuracy": 0.8, "truncated": 0.0, "reward": 1.0,
                                         "seconds": 1.0}] * 2)
        results[name] = [{**r, "length": length, "rho": rho} for r in results[name]]
    return results


def test_check_flags_each_claim():
    assert exp.check(_fake()) == []
    failures = exp.check(_fake(lengths=(30.0, 20.0, 22.0)))
    assert len(failures) == 1 and "length" in failures[0] and "DPO (β = 0.1) 22.000" in failures[0]
    failures = exp.check(_fake(rhos=(0.3, 0.2, 0.4)))
    assert len(failures) == 1 and "ρ" in failures[0]
    flat = exp.check(_fake(accuracy_by_gamma=(0.8, 0.8, 0.79, 0.8)))
    assert len(flat) == 2 and "slope" in flat[0] and "2 standard errors" in flat[1]
    small = exp.check(_fake(accuracy_by_gamma=(0.80, 0.80, 0.81, 0.81)), eval_pairs=1024)
    # √(0.8·0.2/2048 + 0.81·0.19/2048)
    assert len(small) == 1 and "2 standard errors (2 × 0.012)" in small[0]


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "simpo_ablations.md").read_text()
    assert (all(f"| {name} |" in report for name in ["SFT", *exp.SWEPT, *exp.RUNS])
            and "**Check.**" in report)
    assert "tabular policy" in report and "after 30 steps" in report
    assert (tmp_path / "results" / "simpo_ablations.png").stat().st_size > 10_000
