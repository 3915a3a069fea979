"""Engine: one base model on one device — adapters, training ops and the sampler behind one thread-safe facade.

Every tensor op of an engine — loading the model, training ops, adapter I/O, sampler steps — runs on one compute
thread (`treadle.engine.compute`, shared by the engines of one device), whatever thread calls the facade. The
HTTP service calls it from its worker threads; it is equally usable in-process from Python:

    engine = Engine("HuggingFaceTB/SmolLM2-135M-Instruct")
    engine.create_adapter("a", LoraConfig(rank=8))
    engine.forward_backward([ForwardBackwardRequest("a", data, "cross_entropy")])
    engine.optim_step("a", AdamParams(learning_rate=1e-4))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Any

from treadle import ops
from treadle.engine import trainer
from treadle.engine.compute import ComputeThread
from treadle.engine.sampler import Sampler, TokenCallback
from treadle.engine.types import (
    AdamParams,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampleRequest,
    SampleResult,
)
from treadle.engine.vision_input import ImageExpander
from treadle.errors import NotFoundError, TreadleError
from treadle.lora import AdapterBank
from treadle.models.loader import LoadedModel, load_model


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model_name: str
    tokenizer_dir: str
    arch: str
    max_context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_lora_rank: int = 128
    supports_images: bool = False


def _eos_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids = set(loaded.config.eos_token_id)
    tok: Any = loaded.tokenizer
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return tuple(sorted(ids))


class Engine:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        deterministic: bool = False,
        max_lora_rank: int = 128,
        max_batch_size: int = 64,
        kv_cache_mb: float | None = 2048,
        compute: ComputeThread | None = None,
        prefix_retention: bool = True,
    ) -> None:
        """`compute`: the device's compute thread when several engines share a device (the server passes one);
        by default the engine starts its own and stops it on `close`. `kv_cache_mb`: the sampler's KV cache
        stops growing past this (None: unbounded); requests that do not fit wait for room.
        `prefix_retention`: finished requests' KV stays as a prefix source for the next turn (the sampler)."""
        # The numerics mode is process-wide: a server runs in one mode (treadle serve --deterministic).
        ops.set_mode("batch_invariant" if deterministic else "fast")
        self.deterministic = deterministic
        self.name = model
        self._owns_compute = compute is None
        self.compute = compute if compute is not None else ComputeThread()
        try:
            self.loaded = self.compute.call(load_model, model, dtype=dtype, device=device)
            self.compute.call(self._prepare_model, self.loaded)
        except BaseException:
            if self._owns_compute:
                self.compute.close()
            raise
        self.model = self.loaded.model
        self.tokenizer: Any = self.loaded.tokenizer
        cfg = self.loaded.config
        self.images = ImageExpander(cfg, self.loaded.path, model)
        self.info = EngineInfo(
            model_name=model,
            tokenizer_dir=str(self.loaded.path),
            arch=cfg.family,
            max_context_length=self.loaded.max_context_length,
            vocab_size=cfg.vocab_size,
            eos_token_ids=_eos_ids(self.loaded),
            max_lora_rank=max_lora_rank,
            supports_images=self.images.accepts_images,
        )
        self.bank = self.compute.call(AdapterBank, self.model, max_rank=max_lora_rank)
        self.sampler = Sampler(
            self.model,
            self.bank.hook,
            eos_token_ids=self.info.eos_token_ids,
            max_context_length=self.info.max_context_length,
            decode=lambda ids: self.tokenizer.decode(ids),
            max_batch_size=max_batch_size,
            max_kv_cache_bytes=None if kv_cache_mb is None else int(kv_cache_mb * 2**20),
            compute=self.compute,
            weights_key=self._weights_key if prefix_retention else None,
        )

    def _prepare_model(self, loaded: LoadedModel) -> None:
        """On the compute thread once the model is loaded, before the adapters and the sampler exist: a
        subclass's hook (`ShardedEngine` shards the decoder blocks here). Nothing to do for one device."""

    def _weights_key(self, adapter_id: str | None) -> tuple[object, int]:
        """The sampler's key for retained KV: the base model's weights never change; an adapter's do."""
        return (self.model, 0) if adapter_id is None else self.bank.weights_version(adapter_id)

    # adapters -----------------------------------------------------------------------------------
    def create_adapter(self, adapter_id: str, cfg: LoraConfig) -> None:
        self.compute.call(self.bank.create, adapter_id, cfg)

    def remove_adapter(self, adapter_id: str) -> None:
        self.compute.call(self.bank.remove, adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.bank

    def adapter_config(self, adapter_id: str) -> LoraConfig:
        return self.bank.config(adapter_id)

    def snapshot_adapter(self, src_id: str, dst_id: str) -> None:
        self.compute.call(self.bank.copy, src_id, dst_id)

    def save_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> None:
        self.compute.call(
            self.bank.save, adapter_id, Path(directory), optimizer=optimizer, base_model=self.name
        )

    def load_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig:
        if not Path(directory).is_dir():
            raise NotFoundError(f"path: no checkpoint directory at {directory}", field="path")
        return self.compute.call(self.bank.load, adapter_id, Path(directory), optimizer=optimizer)

    # image inputs -------------------------------------------------------------------------------
    def prepare_forward_backward(self, req: ForwardBackwardRequest) -> None:
        """Expand the request's image chunks (decode, check, preprocess); a UserError names the bad chunk."""
        self.images.forward_backward(req)

    def prepare_sample(self, req: SampleRequest) -> None:
        self.images.sample(req)

    # training -----------------------------------------------------------------------------------
    def forward_backward(
        self, requests: list[ForwardBackwardRequest]
    ) -> list[ForwardBackwardResult | TreadleError]:
        errors: dict[int, TreadleError] = {}
        for i, r in enumerate(requests):
            try:
                self.prepare_forward_backward(r)  # a no-op when the service prepared it already
            except TreadleError as e:
                errors[i] = e
        valid = [r for i, r in enumerate(requests) if i not in errors]

        def run() -> list[ForwardBackwardResult | TreadleError]:
            self.sampler.release_idle_memory()  # a large idle KV cache makes room for training
            return trainer.forward_backward(
                self.model,
                self.bank,
                valid,
                vocab_size=self.info.vocab_size,
                max_len=self.info.max_context_length,
            )

        done = iter(self.compute.call(run))  # one trip to the compute thread
        return [errors[i] if i in errors else next(done) for i in range(len(requests))]

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        params.validate()
        return self.compute.call(self.bank.optim_step, adapter_id, params)

    # sampling -----------------------------------------------------------------------------------
    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        """Queue `req` on the shared sampler; `on_token(sample_index, token_id, logprob)` streams each token
        from the sampler thread, and cancelling the future stops generation (see `Sampler.submit`)."""
        if req.adapter_id is not None and req.adapter_id not in self.bank:
            raise NotFoundError(f"model: no adapter {req.adapter_id!r} is loaded", field="model")
        self.prepare_sample(req)
        return self.sampler.submit(req, on_token)

    def generate(self, req: SampleRequest) -> SampleResult:
        return self.sample(req).result()

    def chat(
        self, messages: list[dict[str, str]], *, max_tokens: int = 64, adapter_id: str | None = None
    ) -> str:
        """Greedy chat reply rendered with the model's own template (a convenience for demos and tests)."""
        from treadle.engine.types import SamplingParams

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt, list):
            prompt = list(prompt["input_ids"])
        res = self.generate(
            SampleRequest(
                adapter_id, [int(t) for t in prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0)
            )
        )
        return self.tokenizer.decode(res.sequences[0].tokens, skip_special_tokens=True)

    def health(self) -> dict[str, Any]:
        """Liveness and load, read without waiting for the compute thread (a long training op is not a fault)."""
        return {"adapters": len(self.bank.ids()), "active_rows": self.sampler.active_rows}

    def close(self) -> None:
        self.sampler.close()
        if self._owns_compute:
            self.compute.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
