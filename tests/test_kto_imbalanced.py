"""experiments/kto_imbalanced.py: the imbalanced set and its λ_D, the check, and the smoke run."""

import json

import numpy as np

from align_jax.data import synthetic
from experiments import kto_imbalanced as exp


def test_imbalanced_set_keeps_a_tenth_of_the_desirable_rows_and_rescales_lambda_d(tmp_path):
    pairs = synthetic.sentiment_pairs(200, seed=1, beta=None)
    data = exp.datasets_for(pairs, tmp_path, seed=0, steps=200, batch=16)
    rows = {job: [json.loads(line) for line in path.read_text().splitlines()]
            for job, (path, _, _) in data.items()}
    assert len(rows["DPO"]) == len(pairs) and len(rows["KTO"]) == 2 * len(pairs)
    imbalanced = rows["λ_D sweep"]
    n_d = sum(r["label"] for r in imbalanced)
    assert n_d == int(0.1 * len(pairs)) and len(imbalanced) - n_d == len(pairs)
    assert {r["completion"] for r in imbalanced if not r["label"]} == set(pairs["rejected"])
    _, overrides, runs = data["λ_D sweep"]  # λ_D = 1 and the rescaled λ_D, members of one sweep
    assert overrides[0] == "sweep.field=desirable_weight" and list(runs) == list(exp.RUNS[2:])
    one, weight = (float(v) for v in overrides[1].split("=")[1].strip("[]").split(","))
    assert one == 1.0 and runs[exp.RUNS[3]] == f"desirable_weight={weight:g}"
    np.testing.assert_allclose(weight * n_d / (len(imbalanced) - n_d), 1.0)
    # as many desirable rows drawn as balanced KTO's 200 steps × half of each batch of 16, in
    # batches of 64
    assert overrides[2:] == ["train.steps=275", "train.batch_size=64"]
    assert 275 * 64 * n_d / len(imbalanced) == 200 * 16 * 0.5


def _fake(dpo=1.0, kto=0.9, flat=0.5, rescaled=0.85):
    results = {"SFT": [{"reward": 0.1}]}
    for name, gain in zip(exp.RUNS, (dpo, kto, flat, rescaled)):
        results[name] = [{"reward": 0.1 + gain + e, "seconds": 1.0} for e in (-0.01, 0.01)]
    return results


def test_check_flags_each_claim():
    assert exp.check(_fake()) == []
    np.testing.assert_allclose(exp.recovered(_fake())[exp.RUNS[3]], 0.85)
    assert "KTO recovers 0.50" in exp.check(_fake(kto=0.5))[0]
    failures = exp.check(_fake(flat=0.9, rescaled=0.85))
    assert len(failures) == 1 and "not more than λ_D = 1 (0.90)" in failures[0]
    assert "less than 0.8" in exp.check(_fake(flat=0.5, rescaled=0.6))[0]
    assert "no gain to recover" in exp.check(_fake(dpo=-0.1))[0]


def test_fraction_standard_error_is_the_delta_method_with_the_gains_covariance():
    results = {"SFT": [{"reward": 0.0}]}
    per_seed = {"DPO": [1.0, 2.0, 1.5], "KTO": [0.5, 1.8, 1.0], exp.RUNS[2]: [0.1, -0.2, 0.0],
                exp.RUNS[3]: [1.2, 1.1, 2.0]}
    for name, gains in per_seed.items():
        results[name] = [{"reward": g, "seconds": 1.0} for g in gains]
    se = exp.recovered_se(results)
    d = np.array(per_seed["DPO"])
    for name in exp.RUNS:
        k = np.array(per_seed[name])
        f = k.mean() / d.mean()
        cov = np.cov(k, d) / len(d)  # of the two means
        var = f**2 * (cov[0, 0] / k.mean()**2 + cov[1, 1] / d.mean()**2
                      - 2 * cov[0, 1] / (k.mean() * d.mean()))
        np.testing.assert_allclose(se[name], np.sqrt(var), rtol=1e-9, atol=1e-12)
    assert se["DPO"] == 0.0 and se["KTO"] > 0.1


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "kto_imbalanced.md").read_text()
    assert all(f"| {name} |" in report for name in ["SFT", *exp.RUNS]) and "**Check.**" in report
    assert "log-linear policy" in report and "gain after 300 steps" in report
    assert (tmp_path / "results" / "kto_imbalanced.png").stat().st_size > 10_000
