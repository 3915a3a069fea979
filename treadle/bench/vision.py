"""What an image costs a training step: forward_backward throughput on data with images (vision features cached, and
cold so the tower runs) against the same number of text tokens in the same run. Needs a Qwen3-VL model; given a
text-only one (the default), it writes a tiny random Qwen3-VL model to a temp dir and measures that.
"""

from __future__ import annotations

import io
import tempfile

import numpy as np
import torch
from PIL import Image

from treadle.bench.runner import Row, timed
from treadle.engine.engine import Engine
from treadle.engine.types import Datum, ForwardBackwardRequest, ImageInput, LoraConfig
from treadle.models.qwen3_vl import Qwen3VLForCausalLM


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _image_batch(batch: int, text: int, side: int, vocab: int) -> list[Datum]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(batch):
        toks = torch.randint(0, vocab, (text,), generator=g)
        img = ImageInput(text // 2, _png(side, b), "png", None, f"data[{b}].model_input[1]")
        out.append(Datum(toks, {}, images=[img]))
    return out


def _with_targets(data: list[Datum]) -> list[Datum]:
    for d in data:
        n = int(d.tokens.numel())
        d.loss_fn_inputs = {"target_tokens": d.tokens.roll(-1), "weights": torch.ones(n)}
    return data


def bench_vision(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    batch, text, side, repeat = (2, 64, 128, 2) if quick else (4, 192, 256, 3)
    tmp = tempfile.TemporaryDirectory(prefix="treadle-bench-vision-")
    engine = Engine(model)
    if not isinstance(engine.model, Qwen3VLForCausalLM):
        from treadle.models.tiny_vl import write_tiny_vl_model

        engine.close()
        model = str(write_tiny_vl_model(f"{tmp.name}/qwen3_vl", "qwen3_vl"))
        engine = Engine(model)
    try:
        vlm = engine.model
        assert isinstance(vlm, Qwen3VLForCausalLM)
        engine.create_adapter("bench", LoraConfig(rank=16, seed=0))
        images = _image_batch(batch, text, side, engine.info.vocab_size)
        req = ForwardBackwardRequest("bench", images, "cross_entropy")
        engine.prepare_forward_backward(req)  # decode + preprocess once, as the service does at the edge
        _with_targets(images)
        n_tokens = int(images[0].tokens.numel())
        g = torch.Generator().manual_seed(1)
        text_only = _with_targets(
            [
                Datum(torch.randint(0, engine.info.vocab_size, (n_tokens,), generator=g), {})
                for _ in range(batch)
            ]
        )

        def step(data: list[Datum]) -> None:
            res = engine.forward_backward([ForwardBackwardRequest("bench", data, "cross_entropy")])
            assert not isinstance(res[0], Exception), res[0]

        def cold() -> None:
            vlm._features.clear()  # noqa: SLF001 - the benchmark measures the tower itself
            vlm._feature_bytes = 0  # noqa: SLF001
            step(images)

        tokens = batch * n_tokens
        base = tokens / timed(lambda: step(text_only), repeat=repeat)
        warm = tokens / timed(lambda: step(images), repeat=repeat)
        base2 = tokens / timed(lambda: step(text_only), repeat=repeat)
        cold_tps = tokens / timed(cold, repeat=repeat)
        baseline = (base + base2) / 2  # interleaved, so drift during the run shows in both rows alike
        img_tokens = images[0].spans[0].num_tokens
        rows = [
            Row(f"fwd+bwd, {img_tokens}-token image, features cached", warm, baseline, "tok/s", 0.8),
            Row(f"fwd+bwd, {img_tokens}-token image, tower runs (cold)", cold_tps, baseline, "tok/s", 0.5),
        ]
        extra: dict[str, object] = {
            "model": model,
            "batch": batch,
            "tokens_per_row": n_tokens,
            "image_px": side,
            "image_tokens": img_tokens,
            "baseline": "the same number of text tokens per row, same adapter, measured before and after",
        }
        return rows, extra
    finally:
        engine.close()
        tmp.cleanup()
