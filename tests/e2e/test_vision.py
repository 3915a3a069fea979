"""Vision input end to end: a real `treadle serve --model <tiny Qwen3-VL dir> --image-dir DIR` driven by the
official SDK (ImageChunks in forward_backward, sample and compute_logprobs, token counts as the cookbook computes
them), its refusals (corrupt images, wrong expected_tokens, remote or outside-the-directory asset pointers, audio),
and the cookbook's vlm_classifier recipe for two steps."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
from PIL import Image
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vl_dir(tiny_vl_dirs: dict[str, Path]) -> Path:
    return tiny_vl_dirs["qwen3_vl"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((40, 70, 3), 200, dtype=np.uint8)).save(d / "grey.png")
    return d


@pytest.fixture(scope="module")
def vl_server(
    vl_dir: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = ServerProcess(vl_dir, tmp_path_factory.mktemp("vl-data") / "server", "--image-dir", str(image_dir))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _png(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_image_chunks_train_sample_and_score(vl_server: ServerProcess, vl_dir: Path) -> None:
    from tinker_cookbook.image_processing_utils import get_image_processor
    from tinker_cookbook.renderers.base import image_to_chunk

    processor: Any = get_image_processor(
        str(vl_dir)
    )  # the model's own processor config, as the cookbook loads it
    chunk = image_to_chunk(_png(90, 60, 0), processor)  # jpeg bytes + expected_tokens computed client-side
    assert chunk.expected_tokens == 6
    sc = tinker.ServiceClient(base_url=vl_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=vl_server.model, rank=4, seed=0).result()
    start, end = 49152, 49153  # <|vision_start|>, <|vision_end|>
    prompt = types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[5, 6, start]),
            chunk,
            types.EncodedTextChunk(tokens=[end, 7, 8]),
        ]
    )
    assert prompt.length == 3 + 6 + 3  # the SDK's own accounting
    answer = [30, 31, 32]
    full = prompt.append(types.EncodedTextChunk(tokens=answer[:-1]))
    n = full.length
    weights = np.zeros(n, dtype=np.float32)
    weights[-len(answer) :] = 1.0
    targets = np.zeros(n, dtype=np.int64)
    targets[-len(answer) :] = answer
    datum = types.Datum(
        model_input=full,
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets),
            "weights": types.TensorData.from_numpy(weights),
        },
    )
    losses = []
    for _ in range(3):
        out = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
        losses.append(out.metrics["loss:sum"])
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == n
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=60)
    assert losses[-1] < losses[0]

    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result(timeout=120)
    seq = res.sequences[0]
    # the sampler's logprobs equal forward's for the same image + tokens (Invariant 1, with images)
    scored = prompt.append(types.EncodedTextChunk(tokens=seq.tokens[:-1]))
    tgt = np.zeros(scored.length, dtype=np.int64)
    tgt[-len(seq.tokens) :] = seq.tokens
    fwd = tc.forward(
        [types.Datum(model_input=scored, loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(tgt)})],
        "cross_entropy",
    ).result(timeout=120)
    fwd_lp = fwd.loss_fn_outputs[0]["logprobs"].tolist()[-len(seq.tokens) :]
    assert seq.logprobs is not None and np.allclose(fwd_lp, seq.logprobs, atol=1e-4)
    # compute_logprobs over a prompt with an image: one value per position, position 0 None
    lps = sampler.compute_logprobs(prompt).result(timeout=120)
    assert len(lps) == prompt.length and lps[0] is None
    # a different image changes what follows it (the image is really read)
    other = prompt.model_copy(
        update={"chunks": [prompt.chunks[0], image_to_chunk(_png(90, 60, 1), processor), prompt.chunks[2]]}
    )
    lps2 = sampler.compute_logprobs(other).result(timeout=120)
    assert lps2[-1] is not None and lps[-1] is not None and abs(lps2[-1] - lps[-1]) > 1e-6
    # an asset pointer to a file under --image-dir is read from there
    pointer = types.ImageAssetPointerChunk(format="png", location="grey.png", expected_tokens=2)
    local = types.ModelInput(
        chunks=[types.EncodedTextChunk(tokens=[5, start]), pointer, types.EncodedTextChunk(tokens=[end])]
    )
    assert len(sampler.compute_logprobs(local).result(timeout=120)) == local.length


def test_bad_image_input_is_refused_naming_the_chunk(vl_server: ServerProcess, image_dir: Path) -> None:
    sc = tinker.ServiceClient(base_url=vl_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=vl_server.model, rank=4).result()
    sampler = sc.create_sampling_client(base_model=vl_server.model).result()
    t = types.EncodedTextChunk(tokens=[5, 6])

    def datum(chunk: types.ModelInputChunk, n: int) -> types.Datum:
        return types.Datum(
            model_input=types.ModelInput(chunks=[t, chunk]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.zeros(n, dtype=np.int64))},
        )

    buf = io.BytesIO()
    _png(64, 64, 0).save(buf, format="PNG")
    good = buf.getvalue()
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.model_input\[1\]\.data: not a valid png"):
        tc.forward_backward(
            [datum(types.ImageChunk(data=b"\x89PNG broken", format="png", expected_tokens=4), 6)],
            "cross_entropy",
        ).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.model_input\[1\]\.expected_tokens: 9, but"):
        tc.forward_backward(
            [datum(types.ImageChunk(data=good, format="png", expected_tokens=9), 11)], "cross_entropy"
        ).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.model_input\[1\]\.data: not a valid jpeg"):
        tc.forward_backward(
            [datum(types.ImageChunk(data=good, format="jpeg", expected_tokens=4), 6)], "cross_entropy"
        ).result(timeout=60)
    params = types.SamplingParams(max_tokens=2)
    for location, why in (
        ("https://example.com/cat.png", "fetches nothing from the network"),
        ("../outside.png", "outside the server's --image-dir"),
        (str(image_dir.parent / "x.png"), "outside the server's --image-dir"),
        ("missing.png", "no file"),
    ):
        ptr = types.ImageAssetPointerChunk(format="png", location=location, expected_tokens=1)
        with pytest.raises(tinker.BadRequestError, match=rf"prompt\.chunks\[1\]\.location: .*{why}"):
            sampler.sample(types.ModelInput(chunks=[t, ptr]), 1, params).result(timeout=60)
    # audio: a documented refusal (no audio model family); a DMel chunk of 3 frames (TensorContainer header)
    dmel = types.DmelChunk(dmel=b"\x00\x02\x03\x08" + bytes(96))
    with pytest.raises(
        tinker.BadRequestError, match=r"data\[0\]\.model_input\[1\]: dmel \(audio\).*no audio model"
    ):
        tc.forward_backward([datum(dmel, 5)], "cross_entropy").result(timeout=60)
    # the server still serves
    assert (
        tc.forward_backward(
            [datum(types.ImageChunk(data=good, format="png", expected_tokens=4), 6)], "cross_entropy"
        )
        .result(timeout=60)
        .metrics
    )


def test_vlm_classifier_recipe_two_steps(vl_server: ServerProcess, vl_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TINKER_BASE_URL": vl_server.base_url,
        "TINKER_API_KEY": API_KEY,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "ds-cache"),
    }
    script = Path(__file__).with_name("vlm_classifier_local.py")
    out = tmp_path / "recipe.out"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "exp"), str(vl_dir)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            timeout=600,
            check=False,
        )
    text = out.read_text(errors="replace")
    assert proc.returncode == 0, f"{text[-6000:]}\n--- server log ---\n{vl_server.log()}"
    metrics = next((tmp_path / "exp").glob("*/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "train_mean_nll" in r]
    assert [r["step"] for r in steps] == [0, 1], rows
    assert all(np.isfinite(r["train_mean_nll"]) for r in steps)
    assert "accuracy" in steps[0]  # the recipe's sampling evaluator classified the test images at step 0
    final = json.loads(next((tmp_path / "exp").glob("*/checkpoints.jsonl")).read_text().splitlines()[-1])
    assert str(final["sampler_path"]).startswith("tinker://")


def test_openai_chat_image_url(vl_server: ServerProcess, tinker_server: ServerProcess) -> None:
    import base64

    import openai
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    _png(64, 48, 3).save(buf, format="PNG")
    png = buf.getvalue()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    question = [{"type": "text", "text": "What is in the picture?"}]
    messages: Any = [
        {"role": "user", "content": [*question, {"type": "image_url", "image_url": {"url": url}}]}
    ]
    client = openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model=vl_server.model, messages=messages, max_tokens=4, temperature=0
    )
    # the same prompt as Tinker chunks: the template's text around <|vision_start|> image <|vision_end|>
    tok: Any = AutoTokenizer.from_pretrained(vl_server.model)
    head = tok.encode("<|im_start|>user\nWhat is in the picture?<|vision_start|>", add_special_tokens=False)
    tail = tok.encode("<|vision_end|><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prompt = types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=head),
            types.ImageChunk(data=png, format="png"),
            types.EncodedTextChunk(tokens=tail),
        ]
    )
    # 64×48 px resizes to 64×64: 4 tokens
    assert reply.usage is not None and reply.usage.prompt_tokens == len(head) + 4 + len(tail)
    sc = tinker.ServiceClient(base_url=vl_server.base_url, api_key=API_KEY)
    sampler = sc.create_sampling_client(base_model=vl_server.model).result()
    seq = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result(timeout=120)
    assert reply.choices[0].message.content == tok.decode(seq.sequences[0].tokens, skip_special_tokens=True)

    remote: Any = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}
    ]
    with pytest.raises(
        openai.BadRequestError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: only data: URLs"
    ):
        client.chat.completions.create(model=vl_server.model, messages=remote, max_tokens=2)
    text_only = openai.OpenAI(base_url=tinker_server.base_url + "/v1", api_key=API_KEY)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\]: .*text-only model"):
        text_only.chat.completions.create(model=tinker_server.model, messages=messages, max_tokens=2)
