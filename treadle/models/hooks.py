"""Interfaces the model calls into without importing the layers above it (LoRA, the sampler's KV cache)."""

from __future__ import annotations

from typing import Protocol

import torch


class LoraHook(Protocol):
    """Per-row adapter deltas for one batch (implemented by `treadle.lora`).

    `key` is the Hugging Face module name of the projection (`model.layers.3.self_attn.q_proj`,
    `model.layers.3.mlp.experts.5.gate_proj`, `lm_head`). With `rows=None`, `x` is `(B, T, in)` and row b
    uses row b's adapter; otherwise `x` is `(N, in)` and `rows` `(N,)` gives each token's batch row.
    Returns the delta to add to the base projection, or None when no row's adapter touches `key`.
    A hook may also define `add_delta(key, x, y) -> y + delta` for `(B, T, in)` inputs, adding into the
    projection's fresh output `y` in place (no full-size delta); `Linear` uses it when present.
    """

    def delta(self, key: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None: ...


class KVCacheHook(Protocol):
    """Stores this step's keys/values for `layer` and returns every key/value the step may attend to."""

    def update(
        self, layer: int, k_B_H_T_d: torch.Tensor, v_B_H_T_d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
