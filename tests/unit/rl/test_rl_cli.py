"""`treadle envs list|show` and `treadle rl train` argument checking (no server needed for these paths)."""

from __future__ import annotations

import pytest

from treadle.cli import main
from treadle.rl.training import build_config, parse_overrides, resolve_train_config


def test_envs_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sql", "twenty_questions", "react_tools"))
    assert main(["envs", "show", "sql"]) == 0
    out = capsys.readouterr().out
    assert "max_tool_calls: 4" in out and "licence:" in out and "train: 240" in out
    assert main(["envs", "show", "chess"]) == 2
    assert (
        "unknown env 'chess'; registered envs: react_tools, sql, twenty_questions" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["rl", "train", "sql", "levle=2"],
            "unknown config key 'levle' for `rl train sql`; allowed: base_url,",
        ),
        (["rl", "train", "sql", "level=7"], "level='7': allowed values are 1, 2, 3"),
        (["rl", "train", "sql", "learning_rate=fast"], "learning_rate='fast': expected float"),
        (["rl", "train", "sql", "group_size=0"], "group_size='0': must be >= 1"),
        (["rl", "train", "sql", "loss_fn=magic"], "loss_fn='magic': allowed values are importance_sampling"),
        (["rl", "train", "sql", "level"], "expected key=value, got 'level'"),
        (["rl", "train", "chess"], "unknown env 'chess'"),
    ],
)
def test_rl_train_rejects_bad_input(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_build_config_maps_keys_to_cookbook_config(tmp_path) -> None:  # noqa: ANN001
    config = build_config(
        "react_tools",
        parse_overrides(
            ["level=2", "max_steps=3", "group_size=2", "groups_per_batch=3", f"log_path={tmp_path}"]
        ),
    )
    assert config.max_steps == 3 and config.log_path == str(tmp_path)
    assert config.max_tokens == 128  # the env's max_tokens_per_turn
    assert config.dataset_builder.env_config == {
        "level": 2,
        "seed": 0,
        "demo": 0,
        "hint": 0,
        "tool_bonus": 0.0,
    }
    assert config.dataset_builder.episode_timeout_s == 0.0  # 0 = the env's own wall-clock limit
    assert (config.dataset_builder.group_size, config.dataset_builder.batch_size) == (2, 3)
    assert config.rollout_error_tolerance is True
    assert config.async_config is None
    settings, _ = resolve_train_config("sql", {"max_steps_off_policy": "2"})
    assert settings["max_steps_off_policy"] == 2
    assert build_config("sql", {"max_steps_off_policy": "2"}).async_config.max_steps_off_policy == 2
