"""The Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary attention blocks, and the
patch mergers (the projector into the language model, plus the DeepStack mergers whose outputs are added to the
first decoder layers). Frozen: it runs under no_grad, one image at a time, so an image's features never depend
on what else is in the batch. Parameter names follow transformers (`model.visual.*` on disk → `visual.*` here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    image_token_id: int
    vision_start_token_id: int | None
    vision_end_token_id: int | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        return cls(
            depth=d.get("depth", 27),
            hidden_size=d.get("hidden_size", 1152),
            intermediate_size=d.get("intermediate_size", 4304),
            num_heads=d.get("num_heads", 16),
            in_channels=d.get("in_channels", 3),
            patch_size=d.get("patch_size", 16),
            spatial_merge_size=d.get("spatial_merge_size", 2),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            out_hidden_size=d.get("out_hidden_size", 3584),
            num_position_embeddings=d.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(d.get("deepstack_visual_indexes", (8, 16, 24))),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            image_token_id=int(d.get("image_token_id") or 151655),
            vision_start_token_id=d.get("vision_start_token_id"),
            vision_end_token_id=d.get("vision_end_token_id"),
        )


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name in ("gelu", "gelu_new"):
        return F.gelu(x, approximate="tanh" if name == "gelu_new" else "none")
    if name in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"vision_config.hidden_act: {name!r} is not supported")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(_act(self.act, self.linear_fc1(x)))


class _Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.h = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_N_C: torch.Tensor, cos_N_d: torch.Tensor, sin_N_d: torch.Tensor) -> torch.Tensor:
        N = x_N_C.shape[0]
        q, k, v = self.qkv(x_N_C).reshape(N, 3, self.h, -1).permute(1, 0, 2, 3).unbind(0)  # (N, h, d) each
        cos, sin = cos_N_d[:, None].float(), sin_N_d[:, None].float()
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x_N_C.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x_N_C.dtype)
        d = q.shape[-1]
        # one image: every patch attends to every patch (no mask)
        scores = torch.einsum("nhd,mhd->hnm", q, k) * d**-0.5
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.einsum("hnm,mhd->nhd", probs, v).reshape(N, -1)
        return self.proj(out)


class _Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = _Attention(cfg)
        self.mlp = _Mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, pixels_N_P: torch.Tensor) -> torch.Tensor:
        x = pixels_N_P.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)


class PatchMerger(nn.Module):
    """The projector: LayerNorm, then each 2×2 block of patches concatenated → MLP → the text hidden size."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.merged) if self.postshuffle_norm else x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    rot_inv_freq: torch.Tensor

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )
        head_dim = cfg.hidden_size // cfg.num_heads
        rot = head_dim // 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
        self.register_buffer("rot_inv_freq", inv, persistent=False)

    def _merge_order(self, t: int, h: int, w: int) -> torch.Tensor:
        """Row-major patch index for each patch in merge-block order (the order the processor emits patches)."""
        m = self.cfg.spatial_merge_size
        idx = torch.arange(h * w).view(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
        return idx.repeat(t)

    def _positions(self, t: int, h: int, w: int) -> torch.Tensor:
        """Learned position table (side × side) bilinearly interpolated to h × w, in merge-block order."""
        n, dev = self.side, self.pos_embed.weight.device
        hi, wi = torch.linspace(0, n - 1, h), torch.linspace(0, n - 1, w)
        h0, w0 = hi.int(), wi.int()
        h1, w1 = (h0 + 1).clip(max=n - 1), (w0 + 1).clip(max=n - 1)
        dh, dw = hi - h0, wi - w0
        corners = [
            (h0, w0, (1 - dh)[:, None] * (1 - dw)[None]),
            (h0, w1, (1 - dh)[:, None] * dw[None]),
            (h1, w0, dh[:, None] * (1 - dw)[None]),
            (h1, w1, dh[:, None] * dw[None]),
        ]
        table = self.pos_embed.weight
        out = torch.zeros(h * w, table.shape[1], dtype=table.dtype, device=dev)
        for hh, ww, wt in corners:
            idx = (hh[:, None] * n + ww[None]).flatten().to(dev)
            out = out + table[idx] * wt.flatten().to(dev, table.dtype)[:, None]
        return out[self._merge_order(1, h, w).to(dev)].repeat(t, 1)

    def _rotary(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._merge_order(t, h, w)
        rows, cols = order % (h * w) // w, order % w
        inv = self.rot_inv_freq
        freqs = torch.cat([rows[:, None].float() * inv.cpu(), cols[:, None].float() * inv.cpu()], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1).to(inv.device)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def forward(self, pixels_N_P: torch.Tensor, grid_thw: tuple[int, int, int]) -> list[torch.Tensor]:
        """One image's patches → [merged features (n, D_text), deepstack features…] (n = t·h·w / merge²)."""
        t, h, w = grid_thw
        x = self.patch_embed(pixels_N_P) + self._positions(t, h, w)
        cos, sin = self._rotary(t, h, w)
        deep: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin)
            if i in self.cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return [self.merger(x), *deep]
