"""experiments/dr_grpo_length.py: the smoke run writes its results, the exact filler expectation
follows the model's probabilities, and the check can fail."""

import numpy as np
from flax import nnx

from align_jax.data import synthetic
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import Decoder, DecoderConfig
from experiments import dr_grpo_length as exp


def _sample(right, wrong, filler_right=(3.0, 3.1, 2.9), filler_wrong=(3.0, 3.1, 2.9)):
    return {"right": np.asarray(right, float), "wrong": np.asarray(wrong, float), "accuracy": 0.5,
            "filler right": np.asarray(filler_right, float),
            "filler wrong": np.asarray(filler_wrong, float), "seconds": 1.0}


def test_gap_and_its_standard_error_follow_the_formula():
    sample = _sample([10, 12, 14], [20, 22], filler_wrong=[5.0, 6.0])
    g, se = exp.gap(sample)
    assert g == 21 - 12
    np.testing.assert_allclose(se, np.sqrt(4 / 3 + 2 / 2))
    g, se = exp.gap(sample, "filler")
    np.testing.assert_allclose([g, se], [5.5 - 3.0, np.sqrt(0.5 / 2 + 0.01 / 3)])


def test_expected_filler_is_the_sum_of_survival_probabilities():
    """E[k] = Σ_m Π_{j<m} p_j, checked against the model's own step-by-step next-token probs."""
    tokenizer = tiny_tokenizer()
    model = Decoder(DecoderConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16),
                    rngs=nnx.Rngs(0))
    prompt, work, K = synthetic.arithmetic(1, seed=0, digits=1)["prompt"][0], "<think>3*4=12", 3
    [dot] = tokenizer(" .", add_special_tokens=False)["input_ids"]
    survive, expected = 1.0, 0.0
    for j in range(K):
        ids = np.asarray([tokenizer(prompt + work + " ." * j, add_special_tokens=False)[
            "input_ids"]])
        p = np.exp(np.asarray(model(ids), np.float64)[0, -1])
        survive *= p[dot] / p.sum()
        expected += survive
    np.testing.assert_allclose(exp.expected_filler(model, [prompt], [work], K), [expected],
                               rtol=1e-5)


def test_check_flags_each_way_the_claim_can_fail():
    flat = [3.0, 3.2, 2.8] * 30
    sft = _sample([10, 11], [10, 11], flat, flat)
    grows = _sample([10, 11], [10, 11], flat, [x + 1 for x in flat])
    same = _sample([10, 11], [10, 11], flat, flat)
    assert exp.check({"SFT": sft, "GRPO": [grows], "Dr. GRPO": [same]}) == []
    failures = exp.check({"SFT": sft, "GRPO": [same], "Dr. GRPO": [grows]})
    assert len(failures) == 3 and "under GRPO" in failures[0] and "Dr. GRPO" in failures[2]


def test_regime_states_the_gaps_and_concludes_only_when_grpo_fails_and_the_table_holds():
    flat = [3.0, 3.2, 2.8] * 30
    sft = _sample([10, 11], [10, 11], flat, flat)
    longer = _sample([10, 11], [10, 11], [x + 1 for x in flat], [x + 1 for x in flat])
    grows = _sample([10, 11], [10, 11], flat, [x + 1 for x in flat])
    outside = {"SFT": sft, "GRPO": [longer], "Dr. GRPO": [longer]}
    text = exp.regime(outside, mechanism_holds=True)
    assert "+0.000 ± 0.024 tokens after SFT" in text
    assert "under GRPO +0.000 ± 0.024, while every answer's filler moved by +1.00" in text
    assert "outside the mechanism's regime" in text
    assert "regime" not in exp.regime(outside, mechanism_holds=False).split("acts through")[1]
    assert "outside" not in exp.regime({**outside, "GRPO": [grows]}, mechanism_holds=True)


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "dr_grpo_length.md").read_text()
    assert "| SFT |" in report and "| Dr. GRPO |" in report and "**Check.**" in report
    assert "tabular policy" in report and "after 100 updates" in report
    assert (tmp_path / "results" / "dr_grpo_length.png").stat().st_size > 10_000
