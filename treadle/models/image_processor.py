"""Image input for vision models: decode and check untrusted image bytes, then preprocess exactly as the model's own
image processor (Qwen2-VL's, which Qwen3-VL ships: smart resize to a multiple of patch·merge within the pixel
budget, PIL bicubic, rescale, normalise, and patches in merge-block order), in PIL + numpy so nothing beyond
Pillow is needed. `tests/unit/test_qwen3_vl_image.py` checks it against transformers' processor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from treadle.errors import UserError

FORMATS = {"png": "PNG", "jpeg": "JPEG"}
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # encoded size
MAX_IMAGE_PIXELS = 50_000_000  # decoded width × height (guards against decompression bombs)
MAX_ASPECT_RATIO = 200  # the processor's own limit


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        size = d.get("size") or {}
        return cls(
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
            patch_size=int(d.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(d.get("merge_size", cls.merge_size)),
            image_mean=tuple(d.get("image_mean", cls.image_mean)),
            image_std=tuple(d.get("image_std", cls.image_std)),
            rescale_factor=float(d.get("rescale_factor", cls.rescale_factor)),
            resample=int(d.get("resample", cls.resample)),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ImageProcessorConfig:
        p = model_dir / "preprocessor_config.json"
        return cls.from_dict(json.loads(p.read_text())) if p.is_file() else cls()

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: both sides multiples of `factor`, area within the budget, aspect kept."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, fmt: str, field: str) -> Any:
    """Untrusted bytes → an RGB PIL image, or a UserError naming `field` (format, size, corruption)."""
    from PIL import Image

    if fmt not in FORMATS:
        raise UserError(
            f"{field}.format: {fmt!r} is not supported; use 'png' or 'jpeg'", field=f"{field}.format"
        )
    if not data:
        raise UserError(f"{field}.data: empty image", field=f"{field}.data")
    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(
            f"{field}.data: image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}", field=f"{field}.data"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[FORMATS[fmt]])
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"{field}.data: image is {w}×{h} pixels; the limit is {MAX_IMAGE_PIXELS} pixels",
                    field=f"{field}.data",
                )
            img.load()
    except UserError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes
        raise UserError(
            f"{field}.data: not a valid {fmt} image ({type(e).__name__}: {e})", field=f"{field}.data"
        ) from None
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise UserError(
            f"{field}.data: aspect ratio of {w}×{h} exceeds {MAX_ASPECT_RATIO}", field=f"{field}.data"
        )
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(img: Any, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image → (patches (t·h·w, C·T·P·P) float32, grid (t, h, w)), as Qwen2VLImageProcessor emits them."""
    from PIL import Image

    width, height = img.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    arr = np.array(img.resize((rw, rh), resample=Image.Resampling(cfg.resample)))  # (H, W, C) uint8
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32)
    std = np.array(cfg.image_std, dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # (C, H, W)
    T, P, M = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    frames = np.repeat(x[None], T, axis=0)  # one image = T identical frames
    C, gh, gw = x.shape[0], rh // P, rw // P
    patches = frames.reshape(1, T, C, gh // M, M, P, gw // M, M, P)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(gh * gw, C * T * P * P)), (1, gh, gw)


def num_image_tokens(width: int, height: int, cfg: ImageProcessorConfig) -> int:
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return (rh // cfg.patch_size) * (rw // cfg.patch_size) // cfg.merge_size**2


def image_key(data: bytes, cfg: ImageProcessorConfig) -> str:
    """Content key of an image as the model sees it (bytes + preprocessing), for feature and prefix caches."""
    return hashlib.sha256(data + repr(cfg).encode()).hexdigest()[:32]
