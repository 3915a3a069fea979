"""Rotary position embeddings (default and Llama-3 frequency scaling), computed in fp32 from explicit positions."""

from __future__ import annotations

import math

import torch

from treadle.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1 "NTK-by-parts": keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs_B_T_h = positions_B_T.float()[..., None] * inv_freq.to(positions_B_T.device)
    emb = torch.cat([freqs_B_T_h, freqs_B_T_h], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_B_H_T_d: torch.Tensor, cos_B_T_d: torch.Tensor, sin_B_T_d: torch.Tensor) -> torch.Tensor:
    half = x_B_H_T_d.shape[-1] // 2
    x32 = x_B_H_T_d.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    out = x32 * cos_B_T_d[:, None] + rotated * sin_B_T_d[:, None]
    return out.to(x_B_H_T_d.dtype)
