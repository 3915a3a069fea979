"""Internal request/result types of the engine (dataclasses; the API layer converts wire types to these)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import torch

from treadle.errors import UserError, require
from treadle.lora.config import AdamParams as AdamParams  # re-exported: engine callers import it from here
from treadle.lora.config import LoraConfig as LoraConfig
from treadle.models.qwen3_vl import ImageSpan

if TYPE_CHECKING:
    from treadle.engine.custom_loss import CustomLoss


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """An image chunk as received (`ImageChunk`): encoded bytes placed before text token `offset` of its input.
    `Engine.prepare_*` turns it into image placeholder tokens plus an `ImageSpan` (see engine/vision_input.py)."""

    offset: int
    data: bytes
    format: str  # "png" | "jpeg"
    expected_tokens: int | None
    field: str  # where it came from, for errors: "data[0].model_input[1]"


@dataclasses.dataclass
class Datum:
    """One training example: `tokens` are the model input; `loss_fn_inputs` the per-loss tensors
    (`target_tokens` (N,) or (N, K), `weights`, `logprobs`, `advantages`, …), position i predicting target i."""

    tokens: torch.Tensor  # (N,) int64
    loss_fn_inputs: dict[str, torch.Tensor]
    images: list[ImageInput] = dataclasses.field(default_factory=list)  # not yet expanded into `tokens`
    # expanded images (placeholders in tokens)
    spans: list[ImageSpan] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ForwardBackwardRequest:
    adapter_id: str | None  # None = the base model (forward only)
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] = dataclasses.field(default_factory=dict)
    forward_only: bool = False
    # loss_fn "custom": the uploaded loss the service resolved from loss_fn_config's loss_id
    custom_loss: CustomLoss | None = None


@dataclasses.dataclass
class ForwardBackwardResult:
    loss_fn_outputs: list[dict[str, torch.Tensor]]  # per datum: "logprobs", "elementwise_loss", …
    metrics: dict[str, float]  # keys have exactly one colon: "loss:sum"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None
    # None → stop at EOS; [] → never stop early; list of token ids and/or strings
    stop: tuple[int | str, ...] | None = None

    def validate(self, vocab_size: int) -> None:
        require(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "sampling_params.max_tokens",
            f"must be an integer ≥ 1, got {self.max_tokens!r}",
        )
        require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "sampling_params.temperature",
            f"must be a finite number ≥ 0, got {self.temperature!r}",
        )
        require(0 < self.top_p <= 1, "sampling_params.top_p", f"must be in (0, 1], got {self.top_p!r}")
        require(
            self.top_k == -1 or self.top_k >= 1,
            "sampling_params.top_k",
            f"must be -1 (off) or ≥ 1, got {self.top_k!r}",
        )
        for s in self.stop or ():
            if isinstance(s, int):
                require(
                    0 <= s < vocab_size,
                    "sampling_params.stop",
                    f"token id {s} is outside 0..{vocab_size - 1}",
                )
            elif not isinstance(s, str) or not s:
                raise UserError(
                    "sampling_params.stop: entries must be token ids or non-empty strings",
                    field="sampling_params.stop",
                )


@dataclasses.dataclass
class SampleRequest:
    adapter_id: str | None  # None = base model
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0  # per sampled token: its k most likely (token, logprob) pairs
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt tokens (None: all)
    prompt_alt_tokens_k: int = 0  # k draws at the request's temperature at each prompt position but the first
    target_prompt_logprobs: torch.Tensor | None = None  # int64 [len(prompt) - 1, K]: ids to score; -1 = none
    target_prompt_sparse: bool = False  # it came as sparse CSR: the answer goes back in the same layout
    images: list[ImageInput] = dataclasses.field(default_factory=list)  # not yet expanded into `prompt`
    # expanded images (placeholders in prompt)
    spans: list[ImageSpan] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when topk_sample_logprobs > 0


@dataclasses.dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # len(prompt), NaN at position 0
    # per prompt position: up to k (token, logprob) pairs; position 0 is empty
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_cache_hit_tokens: int = 0
    # float32, the request's [P - 1, K]; 0.0 where it had -1
    target_prompt_logprobs: torch.Tensor | None = None
    # (int64 ids, float32 logprobs), each [P - 1, k]
    prompt_alt_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
