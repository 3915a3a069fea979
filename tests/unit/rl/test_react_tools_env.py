"""The ReAct tool env on scripted trajectories: tools in the sandbox, exact-answer reward, failures and limits."""

from __future__ import annotations

import asyncio
import dataclasses

from tests.unit.rl.helpers import play, stop_reason, total
from treadle.rl.envs.react_tools.env import LIMITS, ReactToolsEnv, make_tasks, parse_answer
from treadle.rl.envs.react_tools.problems import TEMPLATES, WordProblem


def _task(level: int = 2) -> WordProblem:
    return make_tasks("train", {"level": level, "seed": 0})[0]


def test_problems_exact_and_split() -> None:
    for level in (1, 2, 3):
        train = make_tasks("train", {"level": level, "seed": 0})
        test = make_tasks("test", {"level": level, "seed": 0})
        assert {p.template for p in train} == {n for n, (lv, _) in TEMPLATES.items() if lv == level}
        assert not {p.question for p in train} & {p.question for p in test}
        assert all(p.answer >= 0 for p in train + test)
    assert make_tasks("train", {"level": 1, "seed": 0}) == make_tasks("train", {"level": 1, "seed": 0})
    assert make_tasks("train", {"level": 1, "seed": 0}) != make_tasks("train", {"level": 1, "seed": 1})


def test_parse_answer() -> None:
    assert parse_answer("Answer: 1,234 dollars") == 1234
    assert parse_answer("so... Answer: 42.") == 42
    assert parse_answer("Answer: 12 or 13") is None
    assert parse_answer("Answer: 3.5") is None
    assert parse_answer("no answer here") is None


def test_tool_then_correct_answer() -> None:
    task = _task()
    env = ReactToolsEnv(task)
    results = play(env, ["<python>print(40 + 2)</python>", "<calc>6*7</calc>", f"Answer: {task.answer}"])
    assert "Output:\n42" in str(results[0].next_messages[-1]["content"])
    assert results[1].metrics["tool/calc"] == 1.0
    assert total(results) == 1.0 and results[-1].metrics["correct"] == 1.0
    assert stop_reason(results) == "completed" and results[-1].metrics["tool_calls"] == 2.0
    assert env.sandbox is None  # closed at the end of the episode


def test_tool_errors_shown_and_episode_continues() -> None:
    task = _task()
    results = play(
        ReactToolsEnv(task, limits=dataclasses.replace(LIMITS, tool_timeout_s=1.0)),
        ["<calc>1/0</calc>", "<python>while True: pass</python>", "<calc>", f"Answer: {task.answer + 1}"],
    )
    assert "Tool error: ZeroDivisionError" in str(results[0].next_messages[-1]["content"])
    assert "wall-clock timeout" in str(results[1].next_messages[-1]["content"])
    assert results[2].metrics["malformed_tool_call"] == 1
    assert total(results) == 0.0 and results[-1].metrics["correct"] == 0.0


def test_tool_call_limit() -> None:
    results = play(ReactToolsEnv(_task()), ["<calc>1+1</calc>"])
    assert len(results) == 5 and stop_reason(results) == "max_tool_calls" and total(results) == 0.0


def test_sandbox_that_cannot_start_ends_rollout() -> None:
    results = play(ReactToolsEnv(_task(), sandbox_dir="/nonexistent/treadle"), ["<calc>1+1</calc>"])
    assert len(results) == 1 and stop_reason(results) == "tool_error" and total(results) == 0.0
    assert "could not create its directory" in str(results[0].next_messages[-1]["content"])


def test_curriculum_hint_and_tool_bonus() -> None:
    """`hint` only adds the nudge to the task; `tool_bonus` pays once, for a tool call that ran, never above 1."""
    task = _task(1)
    plain = play(ReactToolsEnv(task), [f"Answer: {task.answer}"])
    hinted_env = ReactToolsEnv(task, hint=True, tool_bonus=0.2)
    first = str(asyncio.run(hinted_env.initial_observation())[-1]["content"])
    assert first.startswith(task.question) and first.endswith("Reply with a <calc> tool call first.")
    results = play(
        hinted_env, ["<calc>1/0</calc>", "<calc>2+2</calc>", "<calc>3+3</calc>", f"Answer: {task.answer}"]
    )
    assert [r.reward for r in results] == [
        0.0,
        0.2,
        0.0,
        1.0,
    ]  # the failed call earns nothing; one bonus only
    assert total(plain) == 1.0
    # tool loop without an answer: one bonus, far below answering
    loop = play(ReactToolsEnv(task, tool_bonus=0.5), ["<calc>1+1</calc>"])
    assert total(loop) == 0.5 and stop_reason(loop) == "max_tool_calls"


def test_episode_timeout_override_applies_to_every_env_of_a_group() -> None:
    """The `episode_timeout_s` training key replaces the env's wall-clock limit in every env the group makes."""
    from tinker_cookbook import renderers
    from transformers import AutoTokenizer

    from treadle.models.embedded import embedded_tokenizer_dir
    from treadle.rl.envs.dataset import build_split

    renderer = renderers.get_renderer(
        "qwen3_instruct", AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    )
    for override, expected in ((0.0, LIMITS.episode_timeout_s), (900.0, 900.0)):
        split = build_split("react_tools", "test", {"level": 1}, renderer, 2, 1, episode_timeout_s=override)
        envs = asyncio.run(split.get_batch(0)[0].make_envs())
        assert [e.message_env.limits.episode_timeout_s for e in envs] == [expected, expected]  # type: ignore[attr-defined]
