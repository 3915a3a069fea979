"""Shared test fixtures: tiny random-init model directories and the embedded default model.

Fixture names are a stable API for every test module: `tiny_model_dir` (llama), `tiny_model_dirs`
(family → dir), `tiny_vl_dirs` (Qwen3-VL family → dir), `embedded_model` (a `LoadedModel` of the default
model), `treadle_cache_dir`.

Without `$TREADLE_CACHE_DIR` the session converts into a temp dir and points the Hugging Face cache at a temp
dir too, so tests never touch the user's caches; export `TREADLE_CACHE_DIR` to reuse one conversion across runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import treadle  # noqa: F401  (sets OMP_WAIT_POLICY before anything imports torch)

if TYPE_CHECKING:
    from treadle.models.loader import LoadedModel

_SESSION_TMP: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("TREADLE_CACHE_DIR"):
        tmp = tempfile.mkdtemp(prefix="treadle-test-cache-")
        _SESSION_TMP.append(tmp)
        os.environ["TREADLE_CACHE_DIR"] = str(Path(tmp) / "treadle")
        # The embedded model registers itself in the HF cache: keep that registration inside the session too.
        os.environ["HF_HUB_CACHE"] = str(Path(tmp) / "hf" / "hub")


def pytest_unconfigure(config: pytest.Config) -> None:
    for tmp in _SESSION_TMP:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def treadle_cache_dir() -> Path:
    return Path(os.environ["TREADLE_CACHE_DIR"])


_TINY: dict[str, Path] = {}


@pytest.fixture(scope="session")
def _tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _tiny(root: Path, family: str) -> Path:
    from treadle.models.tiny import write_tiny_model

    if family not in _TINY:
        _TINY[family] = write_tiny_model(root / family, family, seed=0)
    return _TINY[family]


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_root: Path) -> Path:
    """A tiny random llama checkpoint (hidden 64, 2 layers, 4 heads, 2 kv heads) with the SmolLM2 tokenizer."""
    return _tiny(_tiny_root, "llama")


@pytest.fixture(scope="session")
def tiny_model_dirs(_tiny_root: Path) -> dict[str, Path]:
    """family → tiny checkpoint dir, for "llama", "qwen3" and "qwen3_moe" (seed 0 each)."""
    from treadle.models.tiny import TINY_FAMILIES

    return {f: _tiny(_tiny_root, f) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_vl_dirs(_tiny_root: Path) -> dict[str, Path]:
    """family → tiny Qwen3-VL checkpoint dir ("qwen3_vl", "qwen3_vl_moe"; seed 0) with tokenizer and processor."""
    from treadle.models.tiny_vl import TINY_VL_FAMILIES, write_tiny_vl_model

    return {
        f: _TINY.get(f) or _TINY.setdefault(f, write_tiny_vl_model(_tiny_root / f, f))
        for f in TINY_VL_FAMILIES
    }


@pytest.fixture(scope="session")
def embedded_model() -> Iterator[LoadedModel]:
    """The default model (SmolLM2-135M-Instruct, fp32, cpu), converted once per cache dir and loaded once."""
    from treadle.models.embedded import DEFAULT_MODEL
    from treadle.models.loader import load_model

    yield load_model(DEFAULT_MODEL)
