"""Live streaming of the OpenAI endpoints through a real uvicorn server over a real Engine (tiny random llama,
SmolLM2 tokenizer): the first chunk leaves while the sampler is still generating, a client that disconnects
stops generation, streamed text equals non-streamed text (n > 1, stop strings, logprobs, usage), and the
incremental detokenizer never splits a character nor leaks part of a stop string."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from treadle.api.openai import make_router
from treadle.api.openai.generation import GenerationSpec, finish_sequence
from treadle.api.openai.live import IncrementalText, held_back
from treadle.engine.engine import Engine
from treadle.engine.types import LoraConfig, SampledSequence
from treadle.errors import AuthError, NotFoundError

BASE = "tiny-llama"
KEY = "sk-test"
LONG = 1500  # far more decode steps than reading one chunk takes, so "still generating" is not a race


class Backend:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def authenticate(self, authorization_header: str | None) -> str:
        if (authorization_header or "").removeprefix("Bearer ").strip() != KEY:
            raise AuthError("Authorization: unknown API key; pass `Authorization: Bearer <key>`")
        return "me"

    def served_models(self, owner: str) -> list[str]:
        return [BASE]

    async def resolve(self, model: str, owner: str) -> tuple[Engine, str | None]:
        if model == BASE:
            return self.engine, None
        if model.startswith("adapter:"):  # an adapter loaded in the engine, by id
            return self.engine, model.removeprefix("adapter:")
        raise NotFoundError(f"no model named {model!r}", field="model")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    e = Engine(str(tiny_model_dir))
    yield e
    e.close()


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    app = FastAPI()
    app.include_router(make_router(Backend(engine)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn failed to start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join()
    sock.close()


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)


def _wait_until_idle(engine: Engine) -> None:
    """Polls until the sampler has no rows; a stream that is never cancelled fails here after LONG steps."""
    deadline = time.monotonic() + 120
    while engine.sampler.active_rows:
        assert time.monotonic() < deadline, "generation never stopped"
        time.sleep(0.01)


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line.removeprefix("data: "))


def test_first_chunk_arrives_while_the_sampler_is_still_generating(base_url: str, engine: Engine) -> None:
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    pieces: list[str] = []
    finish = None
    with httpx.stream("POST", f"{base_url}/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200
        for chunk in _sse(r.iter_lines()):
            choice = chunk["choices"][0]
            if choice["text"] and not pieces:
                assert engine.sampler.active_rows == 1, "the first text came after generation finished"
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    assert finish == "length", "the tiny model must run to max_tokens for this test to mean anything"
    assert len([p for p in pieces if p]) > 10
    full = _client(base_url).completions.create(
        model=BASE, prompt="Once upon a time", max_tokens=LONG, temperature=0
    )
    assert "".join(pieces) == full.choices[0].text


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_disconnect_cancels_generation(base_url: str, engine: Engine, path: str) -> None:
    body: dict[str, Any] = {"model": BASE, "max_tokens": LONG, "temperature": 0, "stream": True, "n": 2}
    if path == "completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    _wait_until_idle(engine)
    before = engine.sampler.stats.decode_tokens
    with httpx.stream(
        "POST", f"{base_url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ) as r:
        for chunk in _sse(r.iter_lines()):
            ch = chunk["choices"][0]
            if ch.get("text") or (ch.get("delta") or {}).get("content"):
                assert engine.sampler.active_rows == 2
                break  # leaving the block closes the connection mid-stream
    _wait_until_idle(engine)
    # Run to the end, the two rows would have decoded 2 * (LONG - 1) tokens.
    assert engine.sampler.stats.decode_tokens - before < LONG


def _collect(stream: Any, chat: bool) -> tuple[dict[int, str], dict[int, str], Any, dict[int, list[float]]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    lps: dict[int, list[float]] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            piece = ch.delta.content if chat else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
            if chat and ch.logprobs is not None and ch.logprobs.content:
                lps.setdefault(ch.index, []).extend(e.logprob for e in ch.logprobs.content)
            if not chat and ch.logprobs is not None:
                lps.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs or [])
    return texts, finish, usage, lps


def test_chat_stream_equals_non_stream_with_stop_strings_and_logprobs(base_url: str) -> None:
    client = _client(base_url)
    kw: dict[str, Any] = dict(
        model=BASE, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=40, temperature=0
    )
    plain = client.chat.completions.create(**kw).choices[0].message.content or ""
    assert len(plain) > 20
    stop = plain[12:15]  # a stop string the reply really contains
    kw.update(stop=[stop, "never-there"], n=2, logprobs=True)
    full = client.chat.completions.create(**kw)
    texts, finish, usage, lps = _collect(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw), chat=True
    )
    assert texts == {c.index: c.message.content for c in full.choices}
    assert texts[0] == plain[: plain.find(stop)]
    assert finish == {c.index: c.finish_reason for c in full.choices} == {0: "stop", 1: "stop"}
    for c in full.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert lps[c.index] == [e.logprob for e in c.logprobs.content]
    assert usage is not None and full.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens,
        full.usage.completion_tokens,
    )


def test_completions_stream_equals_non_stream_for_many_prompts(base_url: str) -> None:
    client = _client(base_url)
    kw: dict[str, Any] = dict(
        model=BASE, prompt=["The capital of France is", "a b"], max_tokens=12, n=2, temperature=1.0, seed=5
    )
    full = client.completions.create(**kw)
    texts, finish, _, _ = _collect(client.completions.create(stream=True, **kw), chat=False)
    assert texts == {c.index: c.text for c in full.choices}
    assert sorted(finish) == [0, 1, 2, 3]
    greedy = dict(kw, temperature=0, n=1, prompt="Once upon a time", logprobs=0)
    one = client.completions.create(**greedy).choices[0]
    texts, _, _, lps = _collect(client.completions.create(stream=True, **greedy), chat=False)
    assert texts[0] == one.text
    assert one.logprobs is not None and lps[0] == one.logprobs.token_logprobs


def test_failure_mid_stream_ends_with_an_error_event(base_url: str, engine: Engine) -> None:
    engine.create_adapter("doomed", LoraConfig(rank=4, seed=0))
    body = {"model": "adapter:doomed", "prompt": "Once upon a time", "max_tokens": LONG, "stream": True}
    events: list[str] = []
    with httpx.stream(
        "POST", f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if len(events) == 1:
                engine.remove_adapter("doomed")  # the sampler fails the request at its next step
    last = json.loads(events[-1].removeprefix("data: "))
    assert "error" in last and last["error"]["message"]
    assert "data: [DONE]" not in events
    _wait_until_idle(engine)


def test_stream_rejects_bad_input_before_streaming(base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _client(base_url).completions.create(model=BASE, prompt="hi", max_tokens=10**6, stream=True)
    assert "max_tokens" in str(e.value)


@pytest.fixture(scope="module")
def tok(engine: Engine) -> Any:
    return engine.tokenizer


def _spec(stops: list[str]) -> GenerationSpec:
    return GenerationSpec([1], "prompt", 100, 0.0, 1.0, None, 1, stops, [2], 0)


@pytest.mark.parametrize(
    "text,stops",
    [
        ("naïve café 😀 déjà vu 🎉🎉 end", []),
        ("naïve café 😀 déjà vu 🎉🎉 end", ["😀 d"]),
        ("abc abd abe", ["abe", "xyz"]),
        ("the end is near, the end", ["end is", "zz"]),
        ("no stop here at all", ["all!"]),
    ],
)
def test_incremental_text_never_splits_characters_nor_leaks_stops(
    tok: Any, text: str, stops: list[str]
) -> None:
    ids = [*tok.encode(text, add_special_tokens=False), 2]
    final = finish_sequence(tok, SampledSequence(ids, [0.0] * len(ids), "stop"), _spec(stops))
    inc = IncrementalText(tok, stops, [2])
    sent = ""
    for t in ids:
        inc.push(t, 0.0)
        got = inc.take()
        if got is None:
            continue
        sent += got[0]
        assert "\ufffd" not in got[0]
        assert final.text.startswith(sent), "released text must be final"
        assert not any(s in sent for s in stops)
    assert inc.attached <= len(final.token_ids)
    if not stops:  # without stops everything is released as soon as it is whole, at the same offsets
        assert sent == final.text
        assert inc.ends == final.end_offsets


def test_held_back_is_the_longest_stop_prefix_at_the_tail() -> None:
    assert held_back("hello wor", ["world", "or"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc"]) == 2
    assert held_back("abc", ["abc"]) == 0  # a whole stop string is a cut, not a hold
