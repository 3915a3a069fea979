"""What every out-of-process placement shares: the model's tokenizer and image expander loaded here from its
files (no weights), a mirror of the remote engine's adapter ids (so `has_adapter` needs no round trip), and the
adapter and optimizer calls, which are plain remote calls. A placement supplies `_call` (one blocking call of an
`Engine` method in the other process) and starts its engine; see `SubprocessEngine` and `RayEngine`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treadle.engine.placement.api import EngineSpec
from treadle.engine.placement.wire import unpack_error
from treadle.engine.types import AdamParams, LoraConfig

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback
    from treadle.engine.vision_input import ImageExpander


log = logging.getLogger(__name__)


class Pending:
    """A call or sample in flight in the engine's process: its future, and where its streamed tokens go."""

    __slots__ = ("future", "on_token")

    def __init__(self, future: concurrent.futures.Future[Any], on_token: TokenCallback | None) -> None:
        self.future = future
        self.on_token = on_token


class RemoteEngine:
    placement = "remote"

    def __init__(self, spec: EngineSpec, replica: int) -> None:
        self.spec = spec
        self.replica = replica
        self._lock = threading.Lock()  # guards the adapter mirror and the placement's own state
        self._adapters: set[str] = set()  # the remote engine's adapter ids
        self._tokenizer: Any = None
        self._images: ImageExpander | None = None
        self._info: EngineInfo | None = None
        self._pending: dict[int, Pending] = {}  # by request id, guarded by _lock

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `Engine.<method>(*args, **kwargs)` in the engine's process and return its result (or raise)."""
        raise NotImplementedError

    def _deliver(self, msg: tuple[Any, ...]) -> None:
        """One answer from the engine's process: ("tok", id, i, token, logprob) streams a token;
        ("ok", id, result) / ("err", id, error fields) resolves that id's future."""
        kind, rid = msg[0], msg[1]
        if kind == "tok":
            with self._lock:
                p = self._pending.get(rid)
            if p is not None and p.on_token is not None:
                try:
                    p.on_token(msg[2], msg[3], msg[4])
                except Exception:
                    log.exception("token callback failed")
            return
        with self._lock:
            p = self._pending.pop(rid, None)
        if p is None or p.future.done():
            return
        if kind == "ok":
            p.future.set_result(msg[2])
        else:
            p.future.set_exception(unpack_error(msg[2]))

    def _local_model_dir(self) -> Path:
        """The model's files (config, tokenizer, processor) as this process can read them."""
        return Path(self.info.tokenizer_dir)

    def _forget_adapters(self) -> None:
        """A fresh engine process starts with none."""
        with self._lock:
            self._adapters.clear()

    @property
    def label(self) -> str:
        return self.spec.model if self.replica == 0 else f"{self.spec.model} (replica {self.replica})"

    @property
    def info(self) -> EngineInfo:
        assert self._info is not None, "the engine has not started"
        return self._info

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._local_model_dir()))
        return self._tokenizer

    @property
    def images(self) -> ImageExpander:
        if self._images is None:
            from treadle.engine.vision_input import ImageExpander
            from treadle.models.config import ModelConfig

            d = self._local_model_dir()
            self._images = ImageExpander(ModelConfig.from_file(d / "config.json"), d, self.spec.model)
        return self._images

    def create_adapter(self, adapter_id: str, cfg: LoraConfig) -> None:
        self._call("create_adapter", adapter_id, cfg)
        with self._lock:
            self._adapters.add(adapter_id)

    def remove_adapter(self, adapter_id: str) -> None:
        self._call("remove_adapter", adapter_id)
        with self._lock:
            self._adapters.discard(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters

    def snapshot_adapter(self, src_id: str, dst_id: str) -> None:
        self._call("snapshot_adapter", src_id, dst_id)
        with self._lock:
            self._adapters.add(dst_id)

    def save_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> None:
        self._call("save_adapter", adapter_id, Path(directory), optimizer=optimizer)

    def load_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig:
        cfg = self._call("load_adapter", adapter_id, Path(directory), optimizer=optimizer)
        with self._lock:
            self._adapters.add(adapter_id)
        return cfg

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        return self._call("optim_step", adapter_id, params)
