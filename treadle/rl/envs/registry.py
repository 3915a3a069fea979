"""The environment registry: names -> `EnvSpec`, and each env's manifest (JSON package data in manifests/)."""

from __future__ import annotations

import importlib
import json
from functools import cache
from importlib import resources
from typing import Any

from treadle.rl.envs.spec import EnvSpec

# name -> module defining `SPEC`; imported on first use so `treadle envs list` stays light.
_ENV_MODULES: dict[str, str] = {
    "react_tools": "treadle.rl.envs.react_tools.env",
    "sql": "treadle.rl.envs.sql.env",
    "twenty_questions": "treadle.rl.envs.twenty_questions.env",
}


class UnknownEnvError(ValueError):
    """An env name that is not registered; the message lists the registered ones."""


def env_names() -> list[str]:
    return sorted(_ENV_MODULES)


def _check_name(name: str) -> None:
    if name not in _ENV_MODULES:
        raise UnknownEnvError(f"unknown env {name!r}; registered envs: {', '.join(env_names())}")


@cache
def get_env(name: str) -> EnvSpec:
    """The env's spec (imports its module)."""
    _check_name(name)
    spec = importlib.import_module(_ENV_MODULES[name]).SPEC
    assert isinstance(spec, EnvSpec) and spec.name == name
    return spec


@cache
def load_manifest(name: str) -> dict[str, Any]:
    """The env's manifest as shipped in the package (name, version, reward, data, splits, limits, ...)."""
    _check_name(name)
    text = resources.files("treadle.rl.envs").joinpath("manifests", f"{name}.json").read_text()
    return json.loads(text)


def format_manifest(manifest: dict[str, Any]) -> str:
    """A manifest as indented `key: value` lines for the terminal."""
    lines: list[str] = []

    def emit(value: Any, indent: int, key: str) -> None:
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for k, v in value.items():
                emit(v, indent + 1, k)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for item in value:
                emit(item, indent + 1, "-")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: {', '.join(str(v) for v in value) or '(none)'}")
        else:
            lines.append(f"{pad}{key}: {value}")

    for k, v in manifest.items():
        emit(v, 0, k)
    return "\n".join(lines)
