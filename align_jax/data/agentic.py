"""Synthetic multi-turn tasks, deterministic from a seed: an environment with per-turn feedback
and arithmetic with a calculator tool (see `align_jax.envs` for the interfaces).

- **guess the number**: "I am thinking of a number from 1 to 32 …"; each guess is answered
  "higher" or "lower" until it is right (reward 1; 0 for every wrong or missing guess), a
  binary search's worth of turns for a policy that uses the feedback; `guess_demonstrations`
  gives SFT rows of games played by guessing any number still possible (or by bisection).
- **tool arithmetic**: multi-digit sums and products to answer in \\boxed{}, with a
  `calculator` tool called in the `<tool_call>{json}</tool_call>` format; `tool_demonstrations`
  gives SFT rows of both turns of a call (the call, then the answer after the tool's result).
"""

from __future__ import annotations

import ast
import json
import operator
import re

import datasets
import numpy as np

GUESS_INSTRUCTION = ("I am thinking of a number from {low} to {high}. Guess it: reply with one "
                     "number, and I will say higher or lower.")
TOOL_INSTRUCTION = ('You can call a calculator: reply with <tool_call>{"name": "calculator", '
                    '"arguments": {"expression": "..."}}</tool_call> and read its result. Give '
                    'the final answer as \\boxed{number}.')
_INTEGER = re.compile(r"-?\d+")


def _prompt(system: str, text: str, conversational: bool):
    if conversational:
        return [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return f"{system}\n{text}\n"


def guess_number(n: int, seed: int, *, low: int = 1, high: int = 32,
                 conversational: bool = True) -> datasets.Dataset:
    """`n` games of guess the number: prompt-only rows with the `secret` (uniform on
    [low, high]) and the range, for `GuessNumber`."""
    rng = np.random.default_rng(seed)
    instruction = GUESS_INSTRUCTION.format(low=low, high=high)
    return datasets.Dataset.from_list([
        {"prompt": _prompt(instruction, "Your guess?", conversational),
         "secret": int(rng.integers(low, high + 1)), "low": low, "high": high}
        for _ in range(n)])


class GuessNumber:
    """The environment of `guess_number`: the last integer of each turn is the guess; the reply
    is "higher", "lower" or "Reply with one number." (reward 0), and a right guess ends the game
    with reward 1."""

    def reset(self, row: dict) -> None:
        self.secret = int(row["secret"])

    def step(self, completion: str) -> tuple[str | None, float, bool]:
        numbers = _INTEGER.findall(completion)
        if not numbers:
            return "Reply with one number.", 0.0, False
        guess = int(numbers[-1])
        if guess == self.secret:
            return None, 1.0, True
        return ("Higher." if guess < self.secret else "Lower."), 0.0, False


def guess_demonstrations(n: int, seed: int, *, low: int = 1, high: int = 32,
                         bisect: bool = False) -> datasets.Dataset:
    """SFT rows (conversational prompt-completion) of `n` games, one row per guess: the
    conversation so far, then a guess drawn uniformly from the numbers still possible (with
    `bisect`, the middle one: at most ⌈log2(high − low + 1)⌉ + 1 guesses)."""
    rng, rows = np.random.default_rng([seed, 1]), []
    for game in guess_number(n, seed, low=low, high=high):
        prompt, lo, hi, secret = game["prompt"], low, high, game["secret"]
        while True:
            guess = (lo + hi) // 2 if bisect else int(rng.integers(lo, hi + 1))
            rows.append({"prompt": prompt, "completion": [{"role": "assistant",
                                                           "content": str(guess)}]})
            if guess == secret:
                break
            lo, hi = (guess + 1, hi) if guess < secret else (lo, guess - 1)
            prompt = prompt + [{"role": "assistant", "content": str(guess)},
                               {"role": "user", "content": "Higher." if guess < secret
                                else "Lower."}]
    return datasets.Dataset.from_list(rows)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.USub: operator.neg}


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only integers, +, - and * are allowed")


def calculator(expression: str) -> int:
    """Evaluate an arithmetic expression of integers.

    Args:
        expression: integers joined by +, - and *, with parentheses, e.g. "(12+7)*3".
    """
    if len(expression) > 200:
        raise ValueError("the expression is longer than 200 characters")
    return _evaluate(ast.parse(expression, mode="eval").body)


def _problems(n: int, seed: int, digits: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(10 ** (digits - 1), 10 ** digits, size=2))
        op = "+*"[int(rng.integers(2))]
        yield f"{a}{op}{b}", a + b if op == "+" else a * b


def tool_arithmetic(n: int, seed: int, *, digits: int = 3,
                    conversational: bool = True) -> datasets.Dataset:
    """`n` problems "What is a∘b?" (∘ in + and *, operands of `digits` digits): prompt-only rows
    with the `answer`, for GRPO with the `calculator` tool."""
    return datasets.Dataset.from_list([
        {"prompt": _prompt(TOOL_INSTRUCTION, f"What is {expression}?", conversational),
         "answer": answer} for expression, answer in _problems(n, seed, digits)])


def tool_call(expression: str) -> str:
    """The model's text of a calculator call."""
    return "<tool_call>" + json.dumps({"name": "calculator",
                                       "arguments": {"expression": expression}}) + "</tool_call>"


def tool_demonstrations(n: int, seed: int, *, digits: int = 3,
                        tool_fraction: float = 1.0) -> datasets.Dataset:
    """SFT rows (conversational prompt-completion) of `n` problems: for a `tool_fraction` of
    them (drawn at random), two rows, the call and the boxed answer after the tool's result, so
    the loss is on the model's turns only; for the others, the boxed answer straight away."""
    rows, use_tool = [], np.random.default_rng([seed, 2]).random(n) < tool_fraction
    for (expression, answer), tool in zip(_problems(n, seed, digits), use_tool):
        prompt = _prompt(TOOL_INSTRUCTION, f"What is {expression}?", True)
        boxed = [{"role": "assistant", "content": f"\\boxed{{{answer}}}"}]
        if not tool:
            rows.append({"prompt": prompt, "completion": boxed})
            continue
        call = {"role": "assistant", "content": tool_call(expression)}
        result = {"role": "tool", "content": str(answer)}
        rows.append({"prompt": prompt, "completion": [call]})
        rows.append({"prompt": prompt + [call, result], "completion": boxed})
    return datasets.Dataset.from_list(rows)


TASKS = {"guess_number": guess_number, "guess_demonstrations": guess_demonstrations,
         "tool_arithmetic": tool_arithmetic, "tool_demonstrations": tool_demonstrations}
