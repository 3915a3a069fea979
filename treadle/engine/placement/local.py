"""In-process placement: build the engine an `EngineSpec` describes, in this process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from treadle.engine.placement.api import EngineSpec

if TYPE_CHECKING:
    from treadle.engine.compute import ComputeThread
    from treadle.engine.engine import Engine


def make_engine(spec: EngineSpec, compute: ComputeThread | None = None) -> Engine:
    """The engine of `spec`; `compute`: a compute thread shared with the other engines of this process."""
    from treadle.engine.engine import Engine
    from treadle.errors import require

    require(
        isinstance(spec.shards, int) and spec.shards >= 1,
        "shards",
        f"must be an integer ≥ 1, got {spec.shards!r}",
    )
    if spec.shards > 1:  # this process becomes rank 0 and starts the other ranks (treadle/engine/sharded.py)
        from treadle.engine.sharded import ShardedEngine

        return ShardedEngine(spec, compute)
    return Engine(spec.model, compute=compute, **spec.engine_kwargs())
