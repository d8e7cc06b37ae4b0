"""Environments and tools for multi-turn rollouts: plain Python, one instance per sample, run on
the host between generation turns.

An environment has two methods:

    reset(row: dict) -> str | None
        called before the first turn with the prompt's dataset row; text it returns is appended
        to the prompt (to its last user message when the prompt is a conversation), as TRL's
        `environment_factory` does;
    step(completion: str) -> (observation, reward, done)
        called with each model turn's text; `observation` is what the model reads next: text
        (a user turn of the chat template), chat messages (e.g. tool results, role "tool"), or
        None; `reward` is a float or None (nothing this turn); `done` ends the trajectory.

A trajectory's environment reward is the sum of the rewards its steps returned (None if none
did). Tools follow TRL's convention: Python functions with type hints and a docstring that
describes every argument (`tool_schema`); `ToolEnvironment` runs the tool calls of each turn.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from typing import Any, Callable, Protocol, Sequence

from transformers.utils import get_json_schema

Observation = str | list[dict] | None
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class Environment(Protocol):
    def reset(self, row: dict) -> str | None: ...

    def step(self, completion: str) -> tuple[Observation, float | None, bool]: ...


class ToolError(ValueError):
    """A tool that cannot be offered to the model (no type hints, an undocumented argument)."""


def tool_schema(fn: Callable) -> dict:
    """The JSON schema a chat template renders for `fn` (transformers' `get_json_schema`: the
    name, the docstring's description of the function and of each argument, the types from the
    hints); ToolError naming the function when it lacks them."""
    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers raises its own TypeError subclasses here
        raise ToolError(f"tool {getattr(fn, '__name__', fn)!r} cannot be described to the model: "
                        f"{e}") from None


def parse_tool_calls(text: str) -> list[dict | str]:
    """Each `<tool_call>{"name": …, "arguments": {…}}</tool_call>` in `text` (the Hermes/Qwen
    format): a dict {"name", "arguments"}, or a string saying why the call is malformed."""
    calls: list[dict | str] = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('a tool call must be a JSON object with a "name"')
        elif not isinstance(call.get("arguments", {}), dict):
            calls.append(f'the "arguments" of {call["name"]!r} must be a JSON object')
        else:
            calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return calls


class ToolEnvironment:
    """The model may call `tools`: each turn's tool calls run (each within `timeout` seconds) and
    their results come back as tool messages; a turn without a tool call ends the trajectory
    (its reward is the reward functions'). A call that cannot be parsed, names no tool, raises
    or times out returns an error message to the model instead, and counts as a failure."""

    def __init__(self, tools: Sequence[Callable], timeout: float = 10.0):
        self.tools = {tool_schema(fn)["function"]["name"]: fn for fn in tools}
        self.timeout = timeout
        self.calls = self.failures = 0

    def reset(self, row: dict) -> None:
        self.calls = self.failures = 0

    def step(self, completion: str) -> tuple[Observation, None, bool]:
        calls = parse_tool_calls(completion)
        if not calls:
            return None, None, True
        messages = []
        for call in calls:
            ok, content = self._run(call)
            self.calls += 1
            self.failures += not ok
            name = call["name"] if isinstance(call, dict) else "invalid"
            messages.append({"role": "tool", "name": name, "content": content})
        return messages, None, False

    def _run(self, call: dict | str) -> tuple[bool, str]:
        if isinstance(call, str):
            return False, f"Error: {call}"
        fn = self.tools.get(call["name"])
        if fn is None:
            return False, (f"Error: unknown tool {call['name']!r}; the tools are "
                           f"{', '.join(sorted(self.tools))}")
        future = _POOL.submit(fn, **call["arguments"])
        try:
            return True, _as_text(future.result(timeout=self.timeout))
        except concurrent.futures.TimeoutError:
            return False, f"Error: {call['name']} did not return within {self.timeout:g} s"
        except Exception as e:  # the tool's own failure is the model's to see, not a crash
            return False, f"Error: {call['name']} raised {type(e).__name__}: {e}"


# tool calls run on these threads, so a call that hangs is abandoned after its timeout (its thread
# finishes on its own) instead of stopping the rollout
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tool")


def _as_text(result: Any) -> str:
    return result if isinstance(result, str) else json.dumps(result)

