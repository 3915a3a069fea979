"""Internal request/result types of the engine (dataclasses; the API layer converts wire types to these)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import torch

from treadle.errors import UserError, require

if TYPE_CHECKING:
    from treadle.engine.custom_loss import CustomLoss


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    seed: int | None = None
    alpha: float | None = None  # None → alpha = 32 (Tinker's convention: scale = alpha / rank)
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 32.0) / self.rank

    def validate(self, max_rank: int) -> None:
        require(
            isinstance(self.rank, int) and 0 < self.rank <= max_rank,
            "lora_config.rank",
            f"must be an integer in 1..{max_rank}, got {self.rank!r}",
        )
        require(
            self.train_attn or self.train_mlp or self.train_unembed,
            "lora_config",
            "at least one of train_attn, train_mlp, train_unembed must be true",
        )
        if self.alpha is not None:
            require(
                math.isfinite(self.alpha) and self.alpha > 0, "lora_config.alpha", "must be a positive number"
            )


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamParams: decoupled weight decay; grad_clip_norm 0 = no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def validate(self) -> None:
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            v = getattr(self, name)
            require(
                isinstance(v, int | float) and math.isfinite(v) and v >= 0,
                f"adam_params.{name}",
                f"must be a finite number ≥ 0, got {v!r}",
            )
        require(self.beta1 < 1 and self.beta2 < 1, "adam_params.beta1/beta2", "must be < 1")


@dataclasses.dataclass
class Datum:
    """One training example: `tokens` are the model input; `loss_fn_inputs` the per-loss tensors
    (`target_tokens` (N,) or (N, K), `weights`, `logprobs`, `advantages`, …), position i predicting target i."""

    tokens: torch.Tensor  # (N,) int64
    loss_fn_inputs: dict[str, torch.Tensor]


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


@dataclasses.dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


@dataclasses.dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # len(prompt), NaN at position 0
    # per prompt position: up to k (token, logprob) pairs; position 0 is empty
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_cache_hit_tokens: int = 0
