"""treadle.engine: executes ops for one base model on one device (trainer, losses, sampler, scheduler)."""

from __future__ import annotations

from treadle.engine.engine import Engine, EngineInfo
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
