"""experiments/smollm2_grpo.py: the problem split, the rewards, the pairs, the check, and the smoke
run on the real SmolLM2-135M-Instruct."""

import numpy as np

from experiments import report
from experiments import smollm2_grpo as exp


def test_problems_split_the_200_one_digit_problems_once():
    train, held_out = exp.problems(64)
    assert len(train) == 136 and len(held_out) == 64
    questions = [r["prompt"][-1]["content"] for r in train + held_out]
    assert len(set(questions)) == 200
    for row in train + held_out:
        assert row["prompt"][0] == {"role": "system", "content": exp.SYSTEM}
        a, op, b = row["prompt"][-1]["content"].removeprefix("What is ").rstrip("?")
        assert row["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert exp.problems(64) == (train, held_out)


def test_rewards_read_the_boxed_answer_else_the_last_integer():
    replies = ["5 + 5 = 10", "So the answer is \\boxed{10}.", "\\boxed{10} and then 7",
               "5 + 5 = 20\n\nThe answer is 20.", "ten", "-3 - 7 = -10", [
                   {"role": "assistant", "content": "It is 10."}]]
    assert exp.answer_accuracy(replies, [10, 10, 10, 10, 10, -10, 10]) == [1, 1, 1, 0, 0, 1, 1]
    assert exp.answer_format(replies) == [1, 1, 1, 1, 0, 1, 1]
    assert exp.answer_format(["10 is the answer", "\\boxed{10}!", "10 ."]) == [0, 0, 1]


def test_preference_pairs_match_right_replies_with_wrong_ones_of_the_same_prompt():
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a}
            for q, a in (("What is 1+1?", 2), ("What is 2+2?", 4))]
    replies = ["2", "3", "2", "2", "5", "1", "2", "2"] + ["4"] * 8
    assert len(replies) == 2 * exp.SAMPLES
    pairs = exp.preference_pairs(rows, replies)
    assert len(pairs) == 3  # three wrong replies to the first prompt, none to the second
    for p in pairs:
        assert p["prompt"] == rows[0]["prompt"]
        assert p["chosen"][0]["content"] == "2" and p["rejected"][0]["content"] != "2"


def _fake(grpo, dpo):
    """Greedy accuracies as given; sampled ones a quarter above the base model's on each problem."""
    base = {"greedy": np.array([0.0, 0, 1, 0, 0, 1, 0, 0]), "sampled": np.linspace(0, 0.5, 8)}
    return {"base": base, **{name: {"greedy": np.array(greedy, float),
                                    "sampled": base["sampled"] + 0.25}
                             for name, greedy in (("GRPO", grpo), ("DPO", dpo))}}


def test_check_needs_a_paired_gain_beyond_two_standard_errors():
    up = [1, 1, 1, 1, 1, 1, 0, 1]
    assert exp.check(_fake(up, up)) == []
    change, se = report.paired_change(_fake(up, up)["base"]["greedy"], up)
    assert change == 0.625 and np.isclose(se, np.std([1, 1, 0, 1, 1, 0, 0, 1], ddof=1) / 8**0.5)
    failures = exp.check(_fake(up, [0, 0, 1, 0, 0, 1, 0, 0]))
    assert failures == ["DPO changed greedy held-out accuracy by +0.000, not more than 2 standard "
                        "errors (2 × 0.000); T = 1 accuracy by +0.250 ± 0.000"]
    assert len(exp.check(_fake([0] * 8, [1, 0, 1, 0, 0, 1, 0, 0]))) == 2


def test_smoke_run_writes_results(tmp_path):
    exp.main(["--smoke", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    report = (tmp_path / "results" / "smollm2_grpo.md").read_text()
    assert all(f"| {name} |" in report
               for name in ("base", "GRPO full", "GRPO LoRA", "DPO full", "DPO LoRA"))
    assert "LoRA − full fine-tuning, greedy held-out accuracy (paired): GRPO " in report
    assert "completions/s" in report and "pairs/s" in report and "**Check.**" in report
    assert (tmp_path / "results" / "smollm2_grpo.png").stat().st_size > 10_000
