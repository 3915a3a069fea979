"""The narrow interface of one base model's engine, whatever process it runs in.

`treadle.engine.Engine` implements it in-process; `SubprocessEngine` and `RayEngine` implement it by sending the
same calls to an `Engine` elsewhere. Arguments and results are plain picklable values (dataclasses of
`treadle.engine.types`, paths, strings), never closures, so a call can cross a process boundary unchanged.

Failure contract of a remote placement: when the process behind it dies, every call in flight and every
unfinished sample fails with a `WorkerLostError` (category `server`) naming the worker and what happened, and
later calls fail the same way until `restart()` has brought a fresh engine up. The fresh engine has no adapters:
whatever lived only in the dead process's memory is gone (checkpoints on disk are untouched).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from treadle.engine.types import (
    AdamParams,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampleRequest,
    SampleResult,
)
from treadle.errors import TreadleError

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback
    from treadle.engine.vision_input import ImageExpander


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build one engine, in any process: `make_engine(spec)` (placement/local.py) turns it
    into an `Engine`; the subprocess and Ray placements send it to the process that will hold the model."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    deterministic: bool = False
    max_lora_rank: int = 128
    max_batch_size: int = 64
    kv_cache_mb: float | None = 2048
    prefix_retention: bool = True
    shards: int = 1  # > 1: the base model's blocks are sharded over this many ranks with FSDP2
    # A worker process's memory beyond what the loaded model takes (RLIMIT_AS): a request that needs more fails
    # alone with an out-of-memory error instead of the kernel killing the process. None: no limit.
    memory_headroom_mb: float | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        """The `Engine(model, **kwargs)` settings this spec describes (device may be overridden per rank)."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "deterministic": self.deterministic,
            "max_lora_rank": self.max_lora_rank,
            "max_batch_size": self.max_batch_size,
            "kv_cache_mb": self.kv_cache_mb,
            "prefix_retention": self.prefix_retention,
        }


class WorkerLostError(TreadleError):
    """The process that ran an engine died (killed, crashed, out of memory) with this request in it."""

    category = "server"


@runtime_checkable
class EngineAPI(Protocol):
    """One base model on one device (or one group of ranks). Thread-safe: any thread may call any method."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded in the caller's process (chat templates, decoding for the OpenAI API)."""
        ...

    @property
    def images(self) -> ImageExpander:
        """Expands image chunks into placeholder tokens in the caller's process (validation at the edge)."""
        ...

    # adapters
    def create_adapter(self, adapter_id: str, cfg: LoraConfig) -> None: ...
    def remove_adapter(self, adapter_id: str) -> None: ...
    def has_adapter(self, adapter_id: str) -> bool: ...
    def snapshot_adapter(self, src_id: str, dst_id: str) -> None: ...
    def save_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> None: ...
    def load_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig: ...

    # training
    def forward_backward(
        self, requests: list[ForwardBackwardRequest]
    ) -> list[ForwardBackwardResult | TreadleError]: ...
    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]: ...

    # sampling: tokens stream through `on_token(sample_index, token_id, logprob)`; cancelling the future stops
    # generation
    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]: ...

    def health(self) -> dict[str, Any]:
        """Cheap liveness and load figures; raises `WorkerLostError` when the engine's process is gone."""
        ...

    def close(self) -> None: ...
