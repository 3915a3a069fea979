"""The folder tree is the architecture: imports point down the layer list only (ARCHITECTURE.md), and the
client-side libraries never import the server's layers. Every import counts, including ones inside functions
and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import treadle

ROOT = Path(treadle.__file__).parent
# lowest first; a module may import its own layer and the layers below it
SERVER_LAYERS = ["ops", "models", "lora", "engine", "store", "service", "api"]
# talk to a server only through the SDK / HTTP (ARCHITECTURE: "client-side, SDK only")
CLIENT_SIDE = {"rl", "learn", "client_threads", "deploy_cli"}
# importable from anywhere: no treadle imports of their own beyond each other
BASE = {"errors", "atomic"}
# Below-but-not-adjacent imports that are still wrong: the HTTP front ends ask the service, never the store
# (persistence, names and rows are the service's business).
SKIPS = {("api", "store")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "treadle" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m == "treadle" or m.startswith("treadle.")]


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        here = _layer(".".join(rel.parts))
        for line, target in _imports(path):
            there = _layer(target)
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
            if here in BASE and there not in BASE:
                bad.append(f"{where} (base modules import no layer)")
            elif here in CLIENT_SIDE and there in SERVER_LAYERS:
                bad.append(f"{where} (client-side code talks to the server through the SDK only)")
            elif here in SERVER_LAYERS and there in SERVER_LAYERS:
                if SERVER_LAYERS.index(there) > SERVER_LAYERS.index(here):
                    bad.append(f"{where} (imports point down: {here} is below {there})")
                elif (here, there) in SKIPS:
                    bad.append(f"{where} ({here} reaches {there} through the service)")
            elif here in SERVER_LAYERS and there in CLIENT_SIDE:
                bad.append(f"{where} (the server does not depend on client-side libraries)")
    return bad


def test_imports_point_down_only() -> None:
    assert _violations() == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from treadle.api import errors\n")
    assert _imports(bad) == [(2, "treadle.api")]
