"""treadle.ops: the only place that chooses kernels. Select with `set_mode` or the `mode` context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from treadle.errors import UserError
from treadle.ops.base import Ops
from treadle.ops.fast import FastOps

MODES = ("fast", "batch_invariant")
_current: Ops = FastOps()


def _make(name: str) -> Ops:
    if name == "fast":
        return FastOps()
    if name == "batch_invariant":
        from treadle.ops.batch_invariant import BatchInvariantOps

        return BatchInvariantOps()
    raise UserError(f"ops mode: unknown mode {name!r}; allowed: {', '.join(MODES)}", field="mode")


def current() -> Ops:
    """The active implementation (process-wide: a server runs in one mode)."""
    return _current


def set_mode(name: str) -> Ops:
    global _current
    _current = _make(name)
    return _current


@contextlib.contextmanager
def mode(name: str) -> Iterator[Ops]:
    """Temporarily switch implementation (tests, in-process comparisons)."""
    global _current
    prev = _current
    _current = _make(name)
    try:
        yield _current
    finally:
        _current = prev


__all__ = ["MODES", "Ops", "current", "mode", "set_mode"]
