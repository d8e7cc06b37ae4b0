"""Tools and environments: schemas, parsing, failures that become messages, the example tasks."""

import time

import pytest

from align_jax import envs
from align_jax.data import agentic


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "done"


def undocumented(x: int) -> int:
    return x


def test_tool_schema_is_the_chat_templates_and_refuses_an_undescribed_function():
    schema = envs.tool_schema(agentic.calculator)
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    with pytest.raises(envs.ToolError, match="'undocumented' cannot be described"):
        envs.tool_schema(undocumented)


def test_parse_tool_calls_reads_each_call_and_names_what_is_malformed():
    text = ('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
            "<tool_call>{oops}</tool_call><tool_call>[1]</tool_call>"
            '<tool_call>{"name": "f", "arguments": 3}</tool_call>')
    calls = envs.parse_tool_calls(text)
    assert calls[0] == {"name": "calculator", "arguments": {"expression": "2*3"}}
    assert "not valid JSON" in calls[1] and '"name"' in calls[2] and "JSON object" in calls[3]
    assert envs.parse_tool_calls("no call here") == []


def test_tool_environment_answers_every_call_and_counts_the_failures():
    env = envs.ToolEnvironment([agentic.calculator, slow], timeout=0.2)
    env.reset({})
    calls = [agentic.tool_call("12*(3+4)"), agentic.tool_call("2**8"),
             '<tool_call>{"name": "search", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "slow", "arguments": {"seconds": 2}}</tool_call>',
             "<tool_call>{broken</tool_call>"]
    messages, reward, done = env.step("".join(calls))
    assert reward is None and not done and [m["role"] for m in messages] == ["tool"] * 5
    contents = [m["content"] for m in messages]
    assert contents[0] == "84"
    assert "raised ValueError: only integers" in contents[1]
    assert "unknown tool 'search'" in contents[2] and "calculator, slow" in contents[2]
    assert "did not return within 0.2 s" in contents[3]
    assert "not valid JSON" in contents[4]
    assert (env.calls, env.failures) == (5, 4)
    assert env.step("\\boxed{84}") == (None, None, True)  # no call: the trajectory ends


def test_guess_number_says_higher_or_lower_until_right():
    row = agentic.guess_number(1, seed=0)[0]
    env = agentic.GuessNumber()
    env.reset(row)
    secret = row["secret"]
    assert env.step("I guess 0") == ("Higher.", 0.0, False)
    assert env.step(str(secret + 40)) == ("Lower.", 0.0, False)
    assert env.step("hmm") == ("Reply with one number.", 0.0, False)
    assert env.step(f"{secret}") == (None, 1.0, True)


def test_tool_demonstrations_are_two_turns_of_a_right_call():
    rows = agentic.tool_demonstrations(3, seed=1)
    problems = agentic.tool_arithmetic(3, seed=1)
    assert len(rows) == 6
    call, answer = rows[0], rows[1]
    assert call["prompt"] == problems[0]["prompt"]
    expression = problems[0]["prompt"][-1]["content"].removeprefix("What is ").rstrip("?")
    assert call["completion"][0]["content"] == agentic.tool_call(expression)
    assert answer["prompt"][-1] == {"role": "tool", "content": str(problems[0]["answer"])}
    assert answer["completion"][0]["content"] == f"\\boxed{{{problems[0]['answer']}}}"
    assert agentic.calculator(expression) == problems[0]["answer"]


@pytest.mark.parametrize("bisect", [False, True])
def test_guess_demonstrations_play_games_the_environment_accepts(bisect):
    """Replayed against the environment, each game's guesses get "higher"/"lower" (each one still
    possible) until its last one, which is right; by bisection within ⌈log2 32⌉ + 1 = 6."""
    games = agentic.guess_number(8, seed=2)
    rows = list(agentic.guess_demonstrations(8, seed=2, bisect=bisect))
    starts = [k for k, r in enumerate(rows) if len(r["prompt"]) == 2] + [len(rows)]
    assert len(starts) == 9
    for game, first, end in zip(games, starts, starts[1:]):
        env, low, high = agentic.GuessNumber(), 1, 32
        env.reset(game)
        if bisect:
            assert rows[first]["completion"][0]["content"] == "16" and end - first <= 6
        for k in range(first, end):
            guess = int(rows[k]["completion"][0]["content"])
            assert low <= guess <= high
            observation, reward, done = env.step(str(guess))
            assert done == (k == end - 1) and reward == float(done)
            if not done:
                assert rows[k + 1]["prompt"][-1]["content"] == observation
                low, high = (guess + 1, high) if observation == "Higher." else (low, guess - 1)
    if not bisect:  # not a fixed strategy
        assert len({rows[s]["completion"][0]["content"] for s in starts[:-1]}) > 1


def test_tool_fraction_demonstrates_the_tool_on_that_share_of_problems():
    rows, problems = agentic.tool_demonstrations(400, seed=3, tool_fraction=0.25), \
        agentic.tool_arithmetic(400, seed=3)
    calls = [r for r in rows if r["completion"][0]["content"].startswith("<tool_call>")]
    direct = [r for r in rows if len(r["prompt"]) == 2 and r not in calls]
    assert len(calls) + len(direct) == 400 and 0.2 < len(calls) / 400 < 0.3
    answers = {p["prompt"][-1]["content"]: p["answer"] for p in problems}
    assert all(r["completion"][0]["content"] == f"\\boxed{{{answers[r['prompt'][-1]['content']]}}}"
               for r in direct)
