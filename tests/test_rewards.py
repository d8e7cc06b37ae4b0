"""Reward functions: answer extraction, numeric matching, format, DAPO's length penalty, and how
several functions (some returning None) combine."""

import numpy as np
import pytest

from align_jax import rewards


@pytest.mark.parametrize("text, expected", [
    ("<think>2+2=4</think><answer>4</answer>", "4"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),
    ("so the result is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("nested \\boxed{x^{2}} here", "x^{2}"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("the answer is 12", None),
    ("unbalanced \\boxed{12", None),
])
def test_extract_answer(text, expected):
    assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize("predicted, truth, same", [
    ("12", 12, True), ("-3.50", "-3.5", True), ("1,000", 1000, True), ("\\frac{6}{8}", "3/4", True),
    ("$12$", 12, True), ("12.", 12, True), ("13", 12, False), ("x+1", "x+1", True),
    ("x+1", "1+x", False), ("1/0", "1/0", True),
])
def test_answers_match_numerically_then_as_text(predicted, truth, same):
    assert rewards.answers_match(predicted, truth) is same


def test_accuracy_and_format_rewards():
    completions = ["<think>3+4=7</think><answer>7</answer>", "<think>x</think><answer>8</answer>",
                   "7", [{"role": "assistant", "content": "<think>a</think> <answer>7</answer>"}]]
    assert rewards.accuracy(completions, answer=[7, 7, 7, None]) == [1.0, 0.0, 0.0, None]
    assert rewards.think_format(completions) == [1.0, 1.0, 0.0, 1.0]


def test_soft_overlong_punishment_is_dapo_eq_13():
    fn = rewards.soft_overlong_punishment(max_completion_length=20, cache_length=5)
    lengths = [0, 15, 16, 18, 20, 25]
    # ((L_max - L_cache) - |y|) / L_cache, floored at -1
    expected = [0.0, 0.0, -1 / 5, -3 / 5, -1.0, -1.0]
    np.testing.assert_allclose(fn(completion_ids=[[1] * n for n in lengths]), expected)
    with pytest.raises(ValueError, match="cache"):
        rewards.soft_overlong_punishment(10, 0)


def test_score_combines_weighted_functions_and_leaves_none_out():
    funcs = {"a": lambda completions, **_: [1.0, None, None, 0.5],
             "b": lambda completions, answer, **_: [2.0 * x for x in answer[:3]] + [None]}
    r, per = rewards.score(funcs, [1.0, 0.5], prompts=["p"] * 4, completions=["c"] * 4,
                           completion_ids=[[1]] * 4, columns={"answer": [1, 2, np.nan, 0]})
    np.testing.assert_allclose(per, [[1, 2], [np.nan, 4], [np.nan, np.nan], [0.5, np.nan]])
    np.testing.assert_allclose(r, [2.0, 2.0, np.nan, 0.5])  # row 2: no function scored it


def test_score_errors_name_the_function():
    kwargs = dict(prompts=["p"] * 2, completions=["c"] * 2, completion_ids=[[1]] * 2, columns={})
    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        rewards.score({"short": lambda **_: [1.0]}, [1.0], **kwargs)
    with pytest.raises(ValueError,
                       match="'text' returned a value that is not a number or None: 'good'"):
        rewards.score({"text": lambda **_: ["good", 1.0]}, [1.0], **kwargs)


def test_resolve_builtin_and_module_functions():
    assert rewards.resolve("accuracy", {"accuracy": rewards.accuracy}) is rewards.accuracy
    assert rewards.resolve("align_jax.rewards:think_format", {}) is rewards.think_format
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        rewards.resolve("nope", {})
    with pytest.raises(ValueError, match="align_jax.rewards:missing"):
        rewards.resolve("align_jax.rewards:missing", {})


def test_missing_column_names_the_function_and_the_columns():
    with pytest.raises(ValueError, match=r"'accuracy' failed on the dataset's columns \['label'\]"):
        rewards.score({"accuracy": rewards.accuracy}, [1.0], prompts=["p"], completions=["c"],
                      completion_ids=[[1]], columns={"label": [1]})
