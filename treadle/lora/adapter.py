"""One LoRA adapter: its config, its A/B tensors per adapted projection, and its AdamW state.

For a projection y = W x, the adapter adds `scale * B (A x)` with A `(rank, in)` and B `(out, rank)`;
`scale = alpha / rank`. A starts kaiming-uniform (as PEFT does), B starts at zero, so a new adapter
reproduces the base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable

import torch

from treadle.lora.config import LoraConfig
from treadle.models.causal_lm import LoraTarget


@dataclasses.dataclass
class LoraPair:
    """The two factors of one adapted projection (fp32 master weights; leaf tensors)."""

    a_R_In: torch.Tensor
    b_Out_R: torch.Tensor


@dataclasses.dataclass
class AdamState:
    """AdamW moments of one parameter; `step` counts the updates it received (as torch.optim does)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0


def target_enabled(cfg: LoraConfig, group: str) -> bool:
    return {"attn": cfg.train_attn, "mlp": cfg.train_mlp, "unembed": cfg.train_unembed}.get(group, False)


@dataclasses.dataclass
class Adapter:
    """An adapter's tensors. A frozen adapter (a sampling snapshot) has no gradients and no optimizer."""

    config: LoraConfig
    weights: dict[str, LoraPair]  # keyed by the HF module name of the projection
    trainable: bool = True
    optim: dict[str, AdamState] = dataclasses.field(default_factory=dict)  # keyed by parameter name

    @property
    def scale(self) -> float:
        return self.config.scale

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """`(<key>.lora_A, A)`, `(<key>.lora_B, B)` for every adapted projection, in a fixed order."""
        out: list[tuple[str, torch.Tensor]] = []
        for key, pair in self.weights.items():
            out.append((f"{key}.lora_A", pair.a_R_In))
            out.append((f"{key}.lora_B", pair.b_Out_R))
        return out

    def detached_view(self) -> Adapter:
        """The same storage without autograd: rows routed through it contribute no gradient."""
        weights = {k: LoraPair(p.a_R_In.detach(), p.b_Out_R.detach()) for k, p in self.weights.items()}
        return Adapter(self.config, weights, trainable=False)

    def frozen_copy(self) -> Adapter:
        """Weights-only snapshot: new storage, no autograd, no optimizer state."""
        weights = {
            k: LoraPair(p.a_R_In.detach().clone(), p.b_Out_R.detach().clone())
            for k, p in self.weights.items()
        }
        return Adapter(self.config, weights, trainable=False)


def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A init: `nn.init.kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(t.shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def new_adapter(
    cfg: LoraConfig, targets: Iterable[LoraTarget], device: torch.device | str = "cpu"
) -> Adapter:
    """A fresh trainable adapter over the targets its `train_*` switches select.

    A is drawn on the CPU from a generator seeded by `cfg.seed` (random when None), so the same seed gives
    the same adapter on every device and never disturbs the global RNG.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
    weights: dict[str, LoraPair] = {}
    for t in targets:
        if not target_enabled(cfg, t.group):
            continue
        a = kaiming_uniform_(torch.empty(cfg.rank, t.in_features), gen).to(device)
        b = torch.zeros(t.out_features, cfg.rank, device=device)
        weights[t.key] = LoraPair(a.requires_grad_(True), b.requires_grad_(True))
    return Adapter(cfg, weights)
