"""The registry and manifests: every manifest matches what its env actually does (limits, tools, splits, keys)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.rl.helpers import play, stop_reason
from treadle.rl.envs.registry import UnknownEnvError, env_names, format_manifest, get_env, load_manifest

REQUIRED = {
    "name",
    "version",
    "description",
    "tools",
    "sandbox",
    "reward",
    "data",
    "splits",
    "limits",
    "config",
}


def test_three_envs_registered() -> None:
    assert env_names() == ["react_tools", "sql", "twenty_questions"]


@pytest.mark.parametrize("name", env_names())
def test_manifest_matches_env(name: str) -> None:
    manifest = load_manifest(name)
    spec = get_env(name)
    assert REQUIRED <= set(manifest), REQUIRED - set(manifest)
    assert manifest["name"] == spec.name
    assert manifest["limits"] == dataclasses.asdict(spec.limits)
    assert manifest["tools"] == list(spec.tools)
    assert {k: v["default"] for k, v in manifest["config"].items()} == spec.default_config()
    for key in spec.config_keys:
        if key.choices is not None:
            assert manifest["config"][key.name]["allowed"] == list(key.choices)
    config = spec.default_config()
    for split, size in manifest["splits"].items():
        assert len(spec.make_tasks(split, config)) == size, split
    assert manifest["data"]["licence"]
    assert "limits:" in format_manifest(manifest)


@pytest.mark.parametrize("name", env_names())
def test_turn_limit_enforced(name: str) -> None:
    """A policy that never answers is stopped at exactly the manifest's max_turns, with a recorded reason."""
    spec = get_env(name)
    config = spec.default_config()
    task = spec.make_tasks("test", config)[0]
    results = play(spec.make_env(task, config), ["I am not sure yet."])
    assert len(results) == load_manifest(name)["limits"]["max_turns"]
    assert stop_reason(results) == "max_turns"
    assert sum(r.reward for r in results) <= 0.0


@pytest.mark.parametrize("name", env_names())
def test_tasks_are_deterministic_and_splits_disjoint(name: str) -> None:
    spec = get_env(name)
    config = spec.default_config()
    assert spec.make_tasks("train", config)[:5] == spec.make_tasks("train", config)[:5]
    train, test = spec.make_tasks("train", config), spec.make_tasks("test", config)
    assert not set(map(repr, train[:50])) & set(map(repr, test[:50]))


def test_unknown_env_and_config_key_errors() -> None:
    with pytest.raises(UnknownEnvError, match="registered envs: .*twenty_questions"):
        get_env("chess")
    spec = get_env("twenty_questions")
    with pytest.raises(ValueError, match="unknown config key .levl.*allowed: demo, level, seed"):
        spec.resolve_config({"levl": 1})
    with pytest.raises(ValueError, match="level='7': allowed values are 1, 2, 3, 4"):
        spec.resolve_config({"level": "7"})
    with pytest.raises(ValueError, match="seed='x': expected int"):
        spec.resolve_config({"seed": "x"})


@pytest.mark.parametrize("name", env_names())
def test_demo_option_prepends_a_solved_episode(name: str) -> None:
    import asyncio

    spec = get_env(name)
    plain_config = spec.resolve_config({})
    demo_config = spec.resolve_config({"demo": "1"})
    task = spec.make_tasks("test", plain_config)[0]
    plain = asyncio.run(spec.make_env(task, plain_config).initial_observation())
    demo = asyncio.run(spec.make_env(task, demo_config).initial_observation())
    assert demo[0] == plain[0] and demo[-1] == plain[-1]  # same system prompt and task
    middle = demo[1:-1]
    assert len(middle) >= 3 and any(m["role"] == "assistant" for m in middle)
    assert str(middle[-1]["content"]).startswith("Correct")
    # the demo's answer is what the env itself would grade as correct: its format is the env's format
    results = play(spec.make_env(task, demo_config), [str(middle[-2]["content"])])
    assert results[0].metrics.get("format_error", 0) == 0


def test_episode_wall_clock_limit_ends_with_zero_reward() -> None:
    from treadle.rl.envs.sql.env import LIMITS, SqlEnv

    spec = get_env("sql")
    task = spec.make_tasks("test", spec.default_config())[0]
    env = SqlEnv(task, limits=dataclasses.replace(LIMITS, episode_timeout_s=0.0))
    results = play(env, [f"<answer>{task.gold_sql}</answer>"])  # a correct answer, but too late
    assert len(results) == 1 and stop_reason(results) == "rollout_timeout" and results[0].reward == 0.0
