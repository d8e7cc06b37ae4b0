"""experiments/rm_overoptimization.py: the best-of-n estimator against enumeration, the fitted
form, the Bayes ceiling, the check, and the smoke run."""

import itertools
import json

import numpy as np
import pytest

from experiments import rm_overoptimization as exp


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_best_of_n_estimator_equals_enumerating_every_subset(n):
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    brute = np.mean([np.mean([g[list(s)][np.argmax(p[list(s)])]
                              for s in itertools.combinations(range(7), n)])
                     for p, g in zip(proxy, gold)])
    np.testing.assert_allclose(exp.best_of_n_gold(proxy, gold, [n])[0], brute, rtol=1e-12)


def test_best_of_n_weights_are_distributions_and_n_equal_m_picks_the_top():
    w = exp.bon_weights(512, [1, 2, 64, 256, 512])
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(w[0], 1 / 512)
    assert w[-1, -1] == 1.0 and w[-1, :-1].sum() == 0.0


def test_kl_and_fitted_peak_follow_the_formulas():
    ns = np.array([1, 2, 4, 8, 16, 32, 64])
    np.testing.assert_allclose(exp.bon_kl(ns), np.log(ns) - (ns - 1) / ns)
    assert exp.bon_kl([1])[0] == 0.0
    d = np.sqrt(exp.bon_kl(ns))
    alpha, beta, peak = exp.fit_peak(ns, 0.3 + d * (1.5 - 0.5 * d))
    np.testing.assert_allclose([alpha, beta, peak], [1.5, 0.5, 1.5], rtol=1e-9)
    # no peak when the curve is convex
    assert exp.fit_peak(ns, d * (1.0 + 0.1 * d))[2] == float("inf")
    # a proxy that only loses gold reward peaks at once, not at the negative α / 2β
    alpha, beta, peak = exp.fit_peak(ns, d * (-0.4 - 0.2 * d))
    np.testing.assert_allclose([alpha, beta], [-0.4, 0.2], rtol=1e-9)
    assert peak == 0.0


def test_bayes_ceiling():
    delta = np.array([0.0, 1.0, -2.0])
    expected = np.mean([0.5, 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(-2))])
    np.testing.assert_allclose(exp.bayes_ceiling(delta, np.zeros(3)), expected)


def _fake(peaks, accuracy=0.7, ceiling=0.72, accuracies=None):
    ns = [1, 2, 4, 8, 16, 32]
    d = np.sqrt(exp.bon_kl(ns))
    results = {"ns": ns, "oracle": d, "ceiling": ceiling}
    for size, peak, acc in zip(exp.SIZES, peaks, accuracies or [accuracy] * len(peaks)):
        results[size] = [{"accuracy": acc, "bon": d * (2 * peak - d), "peak": peak,
                          "best_step": 8, "epochs": 1.0, "steps": 16, "seconds": 1.0,
                          "best_loss": 0.6}]
    return results


def test_check_flags_each_claim():
    assert exp.check(_fake([0.5, 0.8, 1.0, 1.4])) == []
    failures = exp.check(_fake([0.5, 0.8, 1.0, 1.4], accuracy=0.65))
    assert len(failures) == 1 and "Bayes ceiling 0.720" in failures[0]
    failures = exp.check(_fake([0.5, 1.0, 0.8, 1.4]))
    assert len(failures) == 1 and "N = 4096 0.80" in failures[0]


def test_the_peak_check_leaves_out_proxies_near_chance():
    # ceiling 0.72: a proxy at or below 0.61 is nearer chance than the ceiling
    at_chance = (0.61, 0.65, 0.7, 0.71)
    # where a proxy near chance "peaks" does not count against the others ...
    assert exp.check(_fake([2.0, 0.8, 1.0, 1.4], accuracies=at_chance)) == []
    table = exp.results_table(_fake([2.0, 0.8, 1.0, 1.4], accuracies=at_chance))
    assert table.count("(near chance)") == 1 and "0.610 ± 0.000 (near chance)" in table
    # ... nor for them: the others must still peak later for more data
    failures = exp.check(_fake([0.1, 1.0, 0.8, 1.4], accuracies=at_chance))
    assert len(failures) == 1 and "N = 256" not in failures[0] and "N = 4096 0.80" in failures[0]
    # two sizes beyond chance are too few to compare
    failures = exp.check(_fake([0.5, 0.8, 1.0, 1.4], accuracies=(0.55, 0.6, 0.7, 0.71)))
    assert len(failures) == 1 and "only 2 of the 4 data sizes" in failures[0]


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "rm_overoptimization.md").read_text()
    assert "**Check.**" in report
    for size in (64, 128):  # each proxy is the one of its lowest validation loss, as the table says
        kept = json.loads((tmp_path / "runs" / f"rm_{size}_seed0" / "best.json").read_text())
        assert f"| {size} | {kept['step']} of " in report
    assert (tmp_path / "results" / "rm_overoptimization.png").stat().st_size > 10_000
