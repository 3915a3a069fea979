"""treadle.engine: executes ops for one base model on one device (trainer, losses, sampler, scheduler).

`Engine` is imported lazily: `treadle.lora` imports the types below, and the engine imports `treadle.lora`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)

if TYPE_CHECKING:
    from treadle.engine.engine import Engine, EngineInfo


def __getattr__(name: str) -> Any:
    if name in ("Engine", "EngineInfo"):
        from treadle.engine import engine

        return getattr(engine, name)
    raise AttributeError(name)


__all__ = [
    "AdamParams",
    "Datum",
    "Engine",
    "EngineInfo",
    "ForwardBackwardRequest",
    "ForwardBackwardResult",
    "LoraConfig",
    "SampleRequest",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
]
