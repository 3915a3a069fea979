"""What a LoRA adapter is (rank, scale, which layers) and how it is optimized (AdamW hyperparameters).

These live in the LoRA layer because the adapter bank and the optimizer are built from them; the engine and
the layers above import them from here (imports point down only).
"""

from __future__ import annotations

import dataclasses
import math

from treadle.errors import require


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
