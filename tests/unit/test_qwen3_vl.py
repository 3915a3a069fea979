"""Qwen3-VL parity with transformers (dense and MoE, through the real weight loader, images interleaved with text),
the image preprocessing against transformers' own processor, and MRoPE positions against `get_rope_index`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from treadle.errors import UserError
from treadle.models.image_processor import (
    ImageProcessorConfig,
    decode_image,
    image_key,
    num_image_tokens,
    preprocess,
)
from treadle.models.loader import load_model
from treadle.models.qwen3_vl import ImageSpan, Qwen3VLForCausalLM, mrope_positions
from treadle.models.tiny_vl import PREPROCESSOR_CONFIG


@pytest.fixture(scope="module")
def vl_dirs(tiny_vl_dirs: dict[str, Path]) -> dict[str, Path]:
    return tiny_vl_dirs


def _png(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _interleaved(model: Qwen3VLForCausalLM, cfg: ImageProcessorConfig, images: list[bytes]):
    """text, <vision_start> image <vision_end>, text, … as the processor lays it out, in both conventions."""
    rng = np.random.default_rng(1)
    vc = model.vision_config
    ids: list[int] = []
    types: list[int] = []
    spans: list[ImageSpan] = []
    pixels: list[np.ndarray] = []

    def text(n: int) -> None:
        ids.extend(rng.integers(3, 1000, n).tolist())
        types.extend([0] * n)

    text(5)
    for data in images:
        px, grid = preprocess(decode_image(data, "png", "img"), cfg)
        ids.append(int(vc.vision_start_token_id or 0))
        types.append(0)
        span = ImageSpan(len(ids), grid, torch.from_numpy(px), image_key(data, cfg))
        ids.extend([vc.image_token_id] * span.num_tokens)
        types.extend([1] * span.num_tokens)
        ids.append(int(vc.vision_end_token_id or 0))
        types.append(0)
        spans.append(span)
        pixels.append(px)
        text(3)
    return torch.tensor([ids]), torch.tensor([types]), spans, pixels


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_logits_match_transformers_with_images(vl_dirs: dict[str, Path], family: str) -> None:
    from transformers import AutoModelForImageTextToText

    d = vl_dirs[family]
    model = load_model(str(d)).model
    assert isinstance(model, Qwen3VLForCausalLM)
    # LoRA adapts the language model only; the vision tower and projector stay frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert all(t.key.startswith(("model.layers.", "lm_head")) for t in model.lora_targets())
    hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
    cfg = ImageProcessorConfig.from_dir(d)
    images = [_png(100, 60, 0), _png(64, 64, 1)]
    ids, types, spans, pixels = _interleaved(model, cfg, images)
    grids = torch.tensor([list(s.grid_thw) for s in spans])
    with torch.no_grad():
        ref = hf(
            input_ids=ids,
            pixel_values=torch.from_numpy(np.concatenate(pixels)),
            image_grid_thw=grids,
            mm_token_type_ids=types,
        ).logits
        out = model.logits(model(ids, images=[spans]))
        assert (ref - out).abs().max().item() <= 1e-4
        # the image matters: another image at the same place changes the logits after it
        other = [
            ImageSpan(s.start, s.grid_thw, torch.randn_like(s.pixels), f"other{i}")
            for i, s in enumerate(spans)
        ]
        changed = model.logits(model(ids, images=[other]))
        assert (changed - out)[0, spans[0].start :].abs().max().item() > 1e-3
        # text alone: plain RoPE (all three MRoPE axes equal)
        n = spans[0].start - 1
        assert (hf(input_ids=ids[:, :n]).logits - model.logits(model(ids[:, :n]))).abs().max().item() <= 1e-4


def test_mrope_positions_match_get_rope_index(vl_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText

    d = vl_dirs["qwen3_vl"]
    model = load_model(str(d)).model
    assert isinstance(model, Qwen3VLForCausalLM)
    hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
    ids, types, spans, _ = _interleaved(
        model, ImageProcessorConfig.from_dir(d), [_png(300, 90), _png(40, 40, 2)]
    )
    grids = torch.tensor([list(s.grid_thw) for s in spans])
    ref, _ = hf.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grids)
    T = ids.shape[1]
    ours = mrope_positions(torch.arange(T)[None], [spans])
    assert torch.equal(ref, ours)
    # a window (as a decode step or a partial prefill sees it) gets the same positions
    window = torch.arange(7, T)[None]
    assert torch.equal(mrope_positions(window, [spans]), ref[:, :, 7:])


@pytest.mark.parametrize("size", [(50, 37), (300, 90), (16, 16), (128, 128), (640, 480)])
def test_preprocessing_matches_transformers_processor(size: tuple[int, int]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "image_processor_type"}
    hf = Qwen2VLImageProcessorPil(**kwargs)
    cfg = ImageProcessorConfig.from_dict(PREPROCESSOR_CONFIG)
    data = _png(*size)
    img = decode_image(data, "png", "img")
    pixels, grid = preprocess(img, cfg)
    ref = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert np.array_equal(pixels, ref["pixel_values"])
    # the count the cookbook sends as expected_tokens
    assert num_image_tokens(*size, cfg) == hf.get_number_of_image_patches(size[1], size[0], {}) // 4


def test_bad_images_are_refused_naming_the_field() -> None:
    with pytest.raises(UserError, match=r"chunk\.data: not a valid png image"):
        decode_image(b"\x89PNG\r\n\x1a\nbroken", "png", "chunk")
    with pytest.raises(UserError, match=r"chunk\.data: not a valid jpeg image"):
        decode_image(_png(8, 8), "jpeg", "chunk")  # PNG bytes declared as JPEG
    with pytest.raises(UserError, match=r"chunk\.format: 'gif' is not supported"):
        decode_image(_png(8, 8), "gif", "chunk")
    big = io.BytesIO()
    Image.new("L", (10_000, 6_000)).save(big, format="PNG")  # 60 MP, a few KB compressed
    with pytest.raises(UserError, match=r"chunk\.data: image is 10000×6000 pixels"):
        decode_image(big.getvalue(), "png", "chunk")
