"""The /v1 router on a real Engine (tiny random model, real SmolLM2 tokenizer) driven by the official `openai`
client: results equal the engine's own sampler, streaming replays non-streaming exactly, and bad requests get
OpenAI-shaped 4xx errors naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from treadle.api.openai import make_router
from treadle.engine.engine import Engine
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)
from treadle.errors import AuthError, NotFoundError

BASE = "tiny-llama"
ALICE_CKPT = "tinker://run-alice/sampler_weights/000010"
BOB_CKPT = "tinker://run-bob/sampler_weights/000010"
KEYS = {"sk-alice": "alice", "sk-bob": "bob"}


class OneEngineBackend:
    """The OpenAIBackend protocol over one engine: two API keys, one base model, checkpoints owned per key."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.checkpoints: dict[str, tuple[str, str]] = {}  # path → (owner, adapter id)

    def authenticate(self, authorization_header: str | None) -> str:
        key = (authorization_header or "").removeprefix("Bearer ").strip()
        if key not in KEYS:
            raise AuthError("Authorization: unknown API key; pass `Authorization: Bearer <key>`")
        return KEYS[key]

    def served_models(self, owner: str) -> list[str]:
        return [BASE]

    async def resolve(self, model: str, owner: str) -> tuple[Engine, str | None]:
        if model == BASE:
            return self.engine, None
        found = self.checkpoints.get(model)
        if found is None or found[0] != owner:
            raise NotFoundError(f"no model or checkpoint named {model!r}", field="model")
        return self.engine, found[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    e = Engine(str(tiny_model_dir))
    yield e
    e.close()


@pytest.fixture(scope="module")
def backend(engine: Engine) -> OneEngineBackend:
    return OneEngineBackend(engine)


@pytest.fixture(scope="module")
def http(backend: OneEngineBackend) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(make_router(backend))
    with TestClient(app) as c:
        yield c


def _client(http: TestClient, key: str = "sk-alice") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def _chat_prompt(engine: Engine, text: str) -> list[int]:
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return engine.tokenizer.encode(rendered, add_special_tokens=False)


def _decode(engine: Engine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_models_list_and_auth(http):
    assert [m.id for m in _client(http).models.list()] == [BASE]
    with pytest.raises(openai.AuthenticationError) as e:
        _client(http, "sk-nobody").models.list()
    assert "API key" in str(e.value)


def test_retrieve_model(http):
    assert _client(http).models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        _client(http).models.retrieve("tinker://run-alice/sampler_weights/nope")


def test_chat_equals_the_engines_own_sampler(http, engine):
    out = _client(http).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    prompt = _chat_prompt(engine, "What is the capital of France?")
    direct = engine.sample(
        SampleRequest(None, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    ).result()
    seq = direct.sequences[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _decode(engine, seq.tokens)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 8)
    assert out.usage.total_tokens == len(prompt) + 8


def _stream_texts(stream: Any, field: str) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.delta.content if field == "chat" else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return texts, finish, usage


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 7)])
def test_chat_stream_replays_non_stream(http, temperature, seed):
    client = _client(http)
    kw: dict[str, Any] = dict(
        model=BASE,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12,
        n=2,
        temperature=temperature,
        seed=seed,
    )
    full = client.chat.completions.create(**kw)
    texts, finish, usage = _stream_texts(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw), "chat"
    )
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and full.usage is not None
    assert usage.completion_tokens == full.usage.completion_tokens == 24


def test_completions_stream_text_and_token_prompts(http, engine):
    client = _client(http)
    ids = engine.tokenizer.encode("The capital of France is")
    full = client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=10, temperature=0
    )
    by_ids = client.completions.create(model=BASE, prompt=ids, max_tokens=10, temperature=0)
    texts, finish, _ = _stream_texts(
        client.completions.create(model=BASE, prompt=ids, max_tokens=10, temperature=0, stream=True),
        "completion",
    )
    assert full.choices[0].text == by_ids.choices[0].text == texts[0]
    assert full.usage is not None and full.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=BASE, prompt=["a", "b c"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both samples of one prompt agree


def test_stop_string_cuts_the_text(http):
    client = _client(http)
    kw: dict[str, Any] = dict(model=BASE, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 8, "the tiny model should produce some text"
    stop = text[4:7]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"


def test_logprobs_and_top_logprobs(http, engine):
    out = _client(http).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    c = out.choices[0]
    assert c.logprobs is not None and c.logprobs.content is not None
    entries = c.logprobs.content
    assert len(entries) == 6
    assert "".join(e.token for e in entries) == c.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, with the same (unmodified) logprob.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob

    legacy = _client(http).completions.create(
        model=BASE, prompt="Hi", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert (
        lp is not None
        and lp.tokens is not None
        and lp.top_logprobs is not None
        and lp.text_offset is not None
    )
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def _sft(engine: Engine, adapter: str, prompt: list[int], answer: list[int], steps: int) -> None:
    tokens = torch.tensor(prompt + answer)
    weights = torch.tensor([0.0] * (len(prompt) - 1) + [1.0] * len(answer) + [0.0])
    datum = Datum(tokens, {"target_tokens": torch.roll(tokens, -1), "weights": weights})
    for _ in range(steps):
        [res] = engine.forward_backward([ForwardBackwardRequest(adapter, [datum], "cross_entropy")])
        assert not isinstance(res, Exception)
        engine.optim_step(adapter, AdamParams(learning_rate=5e-3))


def test_checkpoint_model_uses_its_adapter_and_is_owned(http, engine, backend):
    engine.create_adapter("alice-ckpt", LoraConfig(rank=32, seed=0))
    prompt = _chat_prompt(engine, "What is the secret word?")
    answer = engine.tokenizer.encode("zanzibar") + [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    _sft(engine, "alice-ckpt", prompt, answer, steps=40)
    backend.checkpoints[ALICE_CKPT] = ("alice", "alice-ckpt")
    backend.checkpoints[BOB_CKPT] = ("bob", "alice-ckpt")
    msgs: list[Any] = [{"role": "user", "content": "What is the secret word?"}]

    tuned = _client(http).chat.completions.create(
        model=ALICE_CKPT, messages=msgs, max_tokens=8, temperature=0
    )
    base = _client(http).chat.completions.create(model=BASE, messages=msgs, max_tokens=8, temperature=0)
    # The adapter learned to answer and end its turn; the end-of-turn token is stripped from the text.
    assert tuned.choices[0].message.content == "zanzibar"
    assert tuned.choices[0].finish_reason == "stop"
    assert "zanzibar" not in (base.choices[0].message.content or "")

    with pytest.raises(openai.NotFoundError) as e:
        _client(http).chat.completions.create(model=BOB_CKPT, messages=msgs, max_tokens=4)
    assert BASE in str(e.value)  # the 404 lists what this key may use
    assert (
        _client(http, "sk-bob").chat.completions.create(model=BOB_CKPT, messages=msgs, max_tokens=2).choices
    )


def _error(resp: Any) -> dict[str, Any]:
    return json.loads(resp.text)["error"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].image_url.url",
        ),
    ],
)
def test_bad_chat_requests_name_the_field(http, body, param):
    req = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    resp = http.post("/v1/chat/completions", json=req, headers={"Authorization": "Bearer sk-alice"})
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert param.split("[")[0] in err["message"]


def test_unknown_model_and_bad_key_via_the_official_client(http):
    client = _client(http)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4o" in str(e.value) and BASE in str(e.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        )
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        _client(http, "sk-wrong").chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}]
        )
    resp = http.post("/v1/completions", content=b"{not json", headers={"Authorization": "Bearer sk-alice"})
    assert resp.status_code == 400 and _error(resp)["param"] == "body"
    resp = http.post(
        "/v1/completions",
        json={"model": BASE, "prompt": [1, 10**9]},
        headers={"Authorization": "Bearer sk-alice"},
    )
    assert resp.status_code == 400 and _error(resp)["param"] == "prompt"
