"""OpenAI generations count in the server's sampling-token budget: a real uvicorn app with the OpenAI router over
a real Engine (tiny random llama) and a real `Admission`. Tokens are held while generating and given back on
success, on an error, and when a streaming client disconnects; over the budget a request waits, then gets a
429 with Retry-After whose message names the limit, and once room frees it is served."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from treadle.api.openai import make_router
from treadle.engine.engine import Engine
from treadle.errors import AuthError, NotFoundError
from treadle.service.limits import Admission, Limits

BASE = "tiny-llama"
KEY = "sk-budget"
CAP = 400
LONG = 1500  # decode steps enough that a stream is still generating when its first chunk is read


class Backend:
    """The OpenAIBackend protocol over one engine, with the service's sampling-token budget."""

    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.engine = engine
        self.admission = admission

    def authenticate(self, authorization_header: str | None) -> str:
        if (authorization_header or "").removeprefix("Bearer ").strip() != KEY:
            raise AuthError("Authorization: unknown API key")
        return "me"

    def served_models(self, owner: str) -> list[str]:
        return [BASE]

    async def resolve(self, model: str, owner: str) -> tuple[Engine, str | None]:
        if model == BASE:
            return self.engine, None
        if model.startswith("adapter:"):
            return self.engine, model.removeprefix("adapter:")
        raise NotFoundError(f"no model named {model!r}", field="model")

    async def hold_sampling_tokens(self, owner: str, tokens: int) -> Callable[[], None]:
        return await self.admission.wait_for_tokens(owner, tokens)


@pytest.fixture(scope="module")
def admission() -> Admission:
    return Admission(Limits(max_sample_tokens_in_flight=CAP, queue_wait_s=0.3))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    e = Engine(str(tiny_model_dir))
    yield e
    e.close()


@pytest.fixture(scope="module")
def base_url(engine: Engine, admission: Admission) -> Iterator[str]:
    app = FastAPI()
    app.include_router(make_router(Backend(engine, admission)))
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


def _drained(admission: Admission) -> bool:
    deadline = time.monotonic() + 30
    while admission.tokens_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return admission.tokens_in_flight == 0


def test_tokens_are_released_on_success_and_on_error(base_url: str, admission: Admission) -> None:
    c = _client(base_url)
    r = c.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2, temperature=1.0
    )
    assert len(r.choices) == 2 and admission.tokens_in_flight == 0
    c.completions.create(model=BASE, prompt=["one", "two"], max_tokens=4, temperature=0)
    assert admission.tokens_in_flight == 0
    with pytest.raises(openai.NotFoundError, match="no adapter 'nope' is loaded"):
        c.chat.completions.create(
            model="adapter:nope", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    assert admission.tokens_in_flight == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # refused before it holds anything
        c.completions.create(model=BASE, prompt="x", max_tokens=10**6)
    assert admission.tokens_in_flight == 0


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_a_stream_holds_its_tokens_until_the_client_disconnects(
    base_url: str, admission: Admission, path: str
) -> None:
    body: dict[str, Any] = {"model": BASE, "max_tokens": LONG, "temperature": 0, "stream": True}
    if path == "completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    held = 0
    with httpx.stream(
        "POST", f"{base_url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                held = admission.tokens_in_flight
                break  # leaving the block closes the connection mid-stream
    assert held > LONG  # n × (prompt + max_tokens), alone on the server even though it exceeds the cap
    assert _drained(admission), f"{admission.tokens_in_flight} tokens still held after the client left"


def test_over_the_budget_waits_then_429_naming_the_limit(base_url: str, admission: Admission) -> None:
    admission.reserve_tokens(CAP, "someone-else")  # the server is full
    try:
        body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        t0 = time.monotonic()
        r = httpx.post(
            f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert time.monotonic() - t0 >= 0.3  # it waited --queue-wait-s for room first
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        msg = json.loads(r.text)["error"]["message"]
        assert msg.startswith("sampling: no room for ") and "(--queue-wait-s)" in msg
        assert f"{CAP} of the server's {CAP} sampling tokens are in flight (--max-sample-tokens)" in msg
        assert admission.tokens_in_flight == CAP and admission.budget.queued == 0
    finally:
        admission.release_tokens(CAP, "someone-else")
    r = httpx.post(
        f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200 and admission.tokens_in_flight == 0


def test_a_waiting_request_is_served_when_room_frees(base_url: str, admission: Admission) -> None:
    admission.limits.queue_wait_s = 30.0
    admission.reserve_tokens(CAP, "someone-else")
    threading.Timer(0.5, admission.release_tokens, args=(CAP, "someone-else")).start()
    try:
        r = _client(base_url).completions.create(model=BASE, prompt="a", max_tokens=4, temperature=0)
    finally:
        admission.limits.queue_wait_s = 0.3
    assert r.choices[0].text is not None and admission.tokens_in_flight == 0
