"""What an environment is to the registry: its limits, config keys, task generator and message-env factory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tinker_cookbook.rl.message_env import MessageEnv


@dataclass(frozen=True)
class EnvLimits:
    """Budgets one episode runs under; the manifest's `limits` must equal these (a test checks it)."""

    max_turns: int
    max_tokens_per_turn: int
    max_trajectory_tokens: int
    max_tool_calls: int
    tool_timeout_s: float
    episode_timeout_s: float


@dataclass(frozen=True)
class ConfigKey:
    """One env-specific `key=value` the CLI and dataset builders accept, with its type and allowed range."""

    name: str
    default: int | float | str
    help: str
    choices: tuple[int | float | str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: str | int | float) -> int | float | str:
        """Convert and check one value; raises ValueError naming the key and what is allowed."""
        kind = type(self.default)
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}={raw!r}: expected {kind.__name__}") from None
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise ValueError(f"{self.name}={raw!r}: allowed values are {allowed}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{self.name}={raw!r}: must be >= {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{self.name}={raw!r}: must be <= {self.maximum:g}")
        return value


# Keys every generated-data env takes: the generation seed and the curriculum aid for small models.
DEMO_KEY = ConfigKey(
    "demo", 0, "1 = show one solved example episode before the task (helps small models)", choices=(0, 1)
)


def seed_key(what: str) -> ConfigKey:
    return ConfigKey("seed", 0, f"{what} generation seed", minimum=0)


@dataclass(frozen=True)
class EnvSpec:
    """An environment: name, limits, tools, env keys, `make_tasks(split, config)` and `make_env(task, config)`.

    `make_tasks` is deterministic (generated data, fixed seeds); `make_env` returns a single-use cookbook
    `MessageEnv` for one task, which the dataset wraps in the cookbook's `EnvFromMessageEnv`.
    """

    name: str
    limits: EnvLimits
    tools: tuple[str, ...]
    config_keys: tuple[ConfigKey, ...]
    make_tasks: Callable[[str, dict[str, Any]], Sequence[Any]]
    make_env: Callable[[Any, dict[str, Any]], MessageEnv]
    splits: tuple[str, ...] = field(default=("train", "test"))

    def default_config(self) -> dict[str, Any]:
        return {k.name: k.default for k in self.config_keys}

    def resolve_config(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`, each checked; an unknown key is an error listing the known ones."""
        config = self.default_config()
        by_name = {k.name: k for k in self.config_keys}
        for name, raw in (overrides or {}).items():
            if name not in by_name:
                allowed = ", ".join(sorted(by_name))
                raise ValueError(f"unknown config key {name!r} for env {self.name!r}; allowed: {allowed}")
            config[name] = by_name[name].parse(raw)
        return config
