"""Qwen3-VL (dense and MoE): the Qwen3 text stack of `CausalLM` plus the vision tower, interleaved multimodal RoPE
and DeepStack. Images arrive as `ImageSpan`s: an image occupies `num_tokens` consecutive positions of a row
(placeholder ids in `tokens`), whose embeddings are replaced by the projected vision features.

Positions stay plain sequence indices everywhere outside this module (trainer, sampler, KV cache); the 3-D
(t, h, w) MRoPE positions are a pure function of a row's sequence indices and its image spans, so a decode step
needs only the row's spans, never stored rope deltas.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch

from treadle.models.causal_lm import CausalLM, causal_mask
from treadle.models.config import ModelConfig
from treadle.models.hooks import KVCacheHook, LoraHook
from treadle.models.vision import VisionConfig, VisionTower

# Vision features of recent images, by content key (the tower is frozen, so they never change): a training loop
# that revisits an image, or the samples and re-scoring of one prompt, run the tower once. Bounded in bytes.
FEATURE_CACHE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """One preprocessed image placed in a row: tokens `start .. start + num_tokens` are its placeholders."""

    start: int
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w) before merging
    pixels: torch.Tensor  # (t·h·w, C·T·P·P) float32, as the image processor emits them
    key: str  # content hash of the image and its preprocessing (feature cache, prefix cache)
    merge: int = 2

    @property
    def grid_llm(self) -> tuple[int, int, int]:
        t, h, w = self.grid_thw
        return t, h // self.merge, w // self.merge

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_llm
        return t * h * w

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def mrope_positions(
    positions_B_T: torch.Tensor, images: Sequence[Sequence[ImageSpan]] | None
) -> torch.Tensor:
    """(3, B, T) (t, h, w) positions as transformers' `get_rope_index` assigns them: text advances by one per
    token; an image's tokens sit on a grid at the running position, after which the position advances by
    max(h, w) of its merged grid (not by its token count)."""
    pos = positions_B_T.long()
    out = pos[None].repeat(3, 1, 1)
    if not images:
        return out
    for b, spans in enumerate(images):
        shift = 0  # position minus sequence index, accumulated over the images before
        p = pos[b]
        for s in sorted(spans, key=lambda s: s.start):
            inside = (p >= s.start) & (p < s.end)
            after = p >= s.end
            _, gh, gw = s.grid_llm
            base = s.start + shift
            k = p[inside] - s.start
            out[0, b, inside] = base
            out[1, b, inside] = base + k // gw
            out[2, b, inside] = base + k % gw
            shift += max(gh, gw) - s.num_tokens
            out[:, b, after] = p[after] + shift
    return out


def mrope_cos_sin(
    inv_freq: torch.Tensor, pos_3_B_T: torch.Tensor, section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved MRoPE: frequency i uses the h position if i ≡ 1 (mod 3), w if i ≡ 2, t otherwise, within the
    first 3·section[1] / 3·section[2] frequencies (transformers' `apply_interleaved_mrope`)."""
    freqs = pos_3_B_T.float()[..., None] * inv_freq.to(pos_3_B_T.device)  # (3, B, T, d/2)
    f = freqs[0].clone()
    for dim, offset in ((1, 1), (2, 2)):
        idx = slice(offset, section[dim] * 3, 3)
        f[..., idx] = freqs[dim, ..., idx]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Qwen3VLForCausalLM(CausalLM):
    HF_TEXT_PREFIX = "model.language_model."  # Qwen3VLForConditionalGeneration's text stack

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.vision is None:
            raise ValueError("Qwen3VLForCausalLM needs a vision config")
        self.vision_config = VisionConfig.from_dict(cfg.vision)
        self.visual = VisionTower(self.vision_config)
        self._features: collections.OrderedDict[str, list[torch.Tensor]] = collections.OrderedDict()
        self._feature_bytes = 0

    def image_features(self, span: ImageSpan) -> list[torch.Tensor]:
        """[merged (n, D), deepstack_0 (n, D), …] for one image, cached by content key."""
        hit = self._features.get(span.key)
        if hit is not None:
            self._features.move_to_end(span.key)
            return hit
        dev = self.visual.pos_embed.weight.device
        feats = self.visual(span.pixels.to(dev), span.grid_thw)
        self._features[span.key] = feats
        self._feature_bytes += _nbytes(feats)
        while self._feature_bytes > FEATURE_CACHE_BYTES and len(self._features) > 1:
            self._feature_bytes -= _nbytes(self._features.popitem(last=False)[1])
        return feats

    def _visual_rows(
        self, positions_B_T: torch.Tensor, images: Sequence[Sequence[ImageSpan]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
        """(batch index, time index, [features per level]) of every image token inside this window, or None."""
        bs: list[torch.Tensor] = []
        ts: list[torch.Tensor] = []
        levels: list[list[torch.Tensor]] = []
        for b, spans in enumerate(images):
            p = positions_B_T[b]
            for s in spans:
                inside = (p >= s.start) & (p < s.end)
                if not bool(inside.any()):
                    continue
                t_idx = inside.nonzero().squeeze(1)
                k = (p[t_idx] - s.start).long()
                feats = self.image_features(s)
                bs.append(torch.full_like(t_idx, b))
                ts.append(t_idx)
                levels.append([f[k] for f in feats])
        if not bs:
            return None
        per_level = [torch.cat([lv[i] for lv in levels]) for i in range(len(levels[0]))]
        return torch.cat(bs), torch.cat(ts), per_level

    def forward(
        self,
        tokens_B_T: torch.Tensor,
        positions_B_T: torch.Tensor | None = None,
        *,
        mask_B_T_S: torch.Tensor | None = None,
        lora: LoraHook | None = None,
        cache: KVCacheHook | None = None,
        images: Sequence[Sequence[ImageSpan]] | None = None,
    ) -> torch.Tensor:
        B, T = tokens_B_T.shape
        dev = tokens_B_T.device
        if positions_B_T is None:
            positions_B_T = torch.arange(T, device=dev).expand(B, T)
        if mask_B_T_S is None:
            mask_B_T_S = causal_mask(T, T, dev).expand(B, T, T)
        cos_sin = mrope_cos_sin(
            self.inv_freq,  # type: ignore[arg-type]
            mrope_positions(positions_B_T, images),
            self.config.mrope_section,
        )
        x = self.model.embed_tokens(tokens_B_T)
        vis = self._visual_rows(positions_B_T, images) if images else None
        if vis is not None:
            b_idx, t_idx, feats = vis
            x = x.index_put((b_idx, t_idx), feats[0].to(x.dtype))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos_sin, mask_B_T_S, lora, cache)
            if vis is not None and i + 1 < len(vis[2]):
                x = x.index_put((vis[0], vis[1]), vis[2][i + 1].to(x.dtype), accumulate=True)
        return self.model.norm(x)


def build_model(cfg: ModelConfig) -> CausalLM:
    """The model class for a config: Qwen3-VL families get the vision tower, every other family is `CausalLM`."""
    return Qwen3VLForCausalLM(cfg) if cfg.vision is not None else CausalLM(cfg)


def hf_vl_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen3-VL checkpoint names → treadle's (`model.language_model.` → `model.`, `model.visual.` → `visual.`);
    MoE experts stored in the original (E, D, 2I) / (E, I, D) layout are transposed to transformers' in-memory
    (E, 2I, D) / (E, D, I), as its own loader does (a shape that already matches is kept)."""
    out: dict[str, torch.Tensor] = {}
    D, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for k, v in tensors.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual.") :]
        if k.endswith("mlp.experts.gate_up_proj") and v.shape[1:] == (D, 2 * inter) and D != 2 * inter:
            v = v.transpose(1, 2).contiguous()
        elif k.endswith("mlp.experts.down_proj") and v.shape[1:] == (inter, D) and D != inter:
            v = v.transpose(1, 2).contiguous()
        out[k] = v
    return out
