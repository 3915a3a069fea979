"""Vision inputs through the in-process engine: the sampler's prefix cache is keyed on image content (two prompts
that differ only in their image share KV only up to the image), and sampler logprobs equal `forward` logprobs
for prompts with images (Invariant 1)."""

from __future__ import annotations

import concurrent.futures
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from treadle.engine.engine import Engine
from treadle.engine.types import (
    Datum,
    ForwardBackwardRequest,
    ImageInput,
    LoraConfig,
    SampleRequest,
    SampleResult,
    SamplingParams,
)

START, END = 49152, 49153  # <|vision_start|>, <|vision_end|>
TEXT = [5, 6, 7, START, END, 8, 9, 10]  # the image goes between START and END (text offset 4)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_vl_dirs: dict[str, Path]) -> Iterator[Engine]:
    e = Engine(str(tiny_vl_dirs["qwen3_vl"]))
    e.create_adapter("a", LoraConfig(rank=4, seed=0))
    yield e
    e.close()


def _req(seed: int, max_tokens: int = 4, prompt_logprobs: bool = False) -> SampleRequest:
    img = ImageInput(4, _png(seed), "png", None, "prompt.chunks[1]")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=())
    return SampleRequest("a", list(TEXT), params, prompt_logprobs=prompt_logprobs, images=[img])


def _started(engine: Engine, req: SampleRequest) -> concurrent.futures.Future[SampleResult]:
    """Submit `req` and return once its first token is drawn (its prompt KV is then a prefix source)."""
    first = threading.Event()
    fut = engine.sample(req, lambda *_: first.set())
    assert first.wait(timeout=120)
    return fut


def test_prefix_cache_is_keyed_on_image_content(engine: Engine) -> None:
    alone = engine.generate(_req(0)).sequences[0].tokens
    other = _started(
        engine, _req(1, max_tokens=24)
    )  # same text, another image: shares only the text before it
    again = _started(engine, _req(0, max_tokens=24))
    twin = engine.generate(_req(0))  # same image as `again`, which is still generating: shares past the image
    a, o = again.result(timeout=120), other.result(timeout=120)
    assert o.prompt_cache_hit_tokens == 4  # another image: only the text before it (alone's retained KV)
    assert a.prompt_cache_hit_tokens == len(TEXT) + 4 - 1  # alone's image: its retained KV, all but the last
    assert twin.prompt_cache_hit_tokens == len(TEXT) + 4 - 1  # all but the last prompt token (4 image tokens)
    assert a.sequences[0].tokens[:4] == alone == twin.sequences[0].tokens
    assert o.sequences[0].tokens[:4] != alone


def test_sampler_logprobs_equal_forward_with_images(engine: Engine) -> None:
    req = _req(2, prompt_logprobs=True)
    res = engine.generate(req)
    seq = res.sequences[0]
    full = req.prompt + seq.tokens  # the prompt now holds the image placeholders
    d = Datum(
        torch.tensor(full[:-1]),
        {"target_tokens": torch.tensor(full[1:]), "weights": torch.ones(len(full) - 1)},
        spans=req.spans,
    )
    out = engine.forward_backward([ForwardBackwardRequest("a", [d], "cross_entropy", forward_only=True)])[0]
    assert not isinstance(out, Exception)
    lp = out.loss_fn_outputs[0]["logprobs"]
    assert torch.allclose(lp[-len(seq.tokens) :], torch.tensor(seq.logprobs), atol=1e-5)
    assert res.prompt_logprobs is not None
    prompt_lp = torch.tensor(res.prompt_logprobs[1:])
    assert torch.allclose(prompt_lp, lp[: len(req.prompt) - 1], atol=1e-5)


def test_images_expand_in_any_order_with_text(engine: Engine) -> None:
    """An image first, two images back to back, text last: placeholders land where the chunks were."""
    pad = engine.model.config.vision["image_token_id"]  # type: ignore[index]
    imgs = [ImageInput(off, _png(s), "png", 4, f"c{s}") for off, s in ((0, 3), (2, 4), (2, 5))]
    tokens, spans = engine.images.expand([11, 12, 13], imgs)
    assert tokens == [pad] * 4 + [11, 12] + [pad] * 8 + [13]
    assert [s.start for s in spans] == [0, 6, 10]
    assert len({s.key for s in spans}) == 3
    lp = engine.forward_backward(
        [
            ForwardBackwardRequest(
                "a",
                [Datum(torch.tensor(tokens), {"target_tokens": torch.tensor(tokens)}, spans=spans)],
                "cross_entropy",
                forward_only=True,
            )
        ]
    )[0]
    assert not isinstance(lp, Exception)
    assert torch.isfinite(lp.loss_fn_outputs[0]["logprobs"]).all()
