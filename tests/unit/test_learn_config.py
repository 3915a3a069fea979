"""`treadle learn` configuration: key=value words → a typed, validated LearnConfig; bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.errors import UserError
from treadle.learn.config import LearnConfig, parse_config


def test_key_values_are_typed() -> None:
    cfg = parse_config(
        ["loss=ppo", "min_traces=4", "learning_rate=3e-4", "use_corrections=false", "reward=model:judge"],
        deployment="agent",
    )
    assert cfg == LearnConfig(
        deployment="agent",
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        loss="ppo",
        min_traces=4,
        learning_rate=3e-4,
        use_corrections=False,
        reward="model:judge",
    )


@pytest.mark.parametrize(
    ("words", "field", "message"),
    [
        (["nope=1"], "nope", "unknown config key; allowed: deployment, base_url"),
        (["min_traces"], "config", "expected key=value"),
        (["min_traces=many"], "min_traces", "expected int, got 'many'"),
        (["use_rewards=maybe"], "use_rewards", "expected true or false"),
        (["loss=sft"], "loss", "must be one of importance_sampling, ppo"),
        (["reward=rule:nocolon"], "reward", "must be 'feedback'"),
        (["learning_rate=0"], "learning_rate", "must be > 0"),
        (["gate_tolerance=-1"], "gate_tolerance", "must be >= 0"),
        (["min_traces=10", "max_traces=5"], "max_traces", r"must be >= min_traces \(10\)"),
        (["gate_set=/no/such/file.jsonl"], "gate_set", "no such file"),
        (["init_state=tinker://r/sampler_weights/x"], "init_state", "tinker://RUN/weights/NAME"),
        (["use_rewards=false", "use_corrections=false"], "use_rewards", "at least one"),
    ],
)
def test_bad_config_names_the_key(words: list[str], field: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        parse_config(words, deployment="agent")
    assert e.value.field == field


def test_deployment_is_required_and_state_file_defaults_under_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="deployment: required"):
        parse_config([])
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path))
    assert parse_config([], deployment="a").resolved_state_file() == tmp_path / "learn" / "a.json"
    assert (
        parse_config([f"state_file={tmp_path}/s.json"], deployment="a").resolved_state_file()
        == tmp_path / "s.json"
    )


def test_cli_refuses_unknown_key_before_contacting_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    from treadle.cli import main

    assert main(["learn", "--deployment", "agent", "bogus=1", "base_url=http://127.0.0.1:9"]) == 2
    assert "bogus: unknown config key" in capsys.readouterr().err
