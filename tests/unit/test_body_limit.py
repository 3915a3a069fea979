"""The request size limit: declared and streamed (chunked) bodies, both body-reading paths of the API (FastAPI's
own parsing of a JSON model, and a route reading raw bytes), each answered 413 with a JSON detail."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from treadle.api.body_limit import BodyLimit
from treadle.api.errors import install_error_handlers

LIMIT = 1000


class Payload(BaseModel):
    text: str


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=LIMIT)

    @app.post("/json")
    async def json_route(p: Payload) -> dict[str, int]:
        return {"n": len(p.text)}

    @app.post("/raw")
    async def raw_route(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    with TestClient(app) as c:
        yield c


def _chunks(total: int, size: int = 300) -> Iterator[bytes]:
    while total > 0:
        yield b"x" * min(size, total)
        total -= size


def _is_413(r: Any) -> None:
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == f"body: requests are limited to {LIMIT} bytes on this server"


@pytest.mark.parametrize("path", ["/raw", "/json"])
def test_declared_length_over_limit(client: TestClient, path: str) -> None:
    _is_413(client.post(path, content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"}))


@pytest.mark.parametrize("path", ["/raw", "/json"])
def test_streamed_body_over_limit(client: TestClient, path: str) -> None:
    r = client.post(path, content=_chunks(LIMIT + 1), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    _is_413(r)


def test_bodies_within_the_limit_pass(client: TestClient) -> None:
    assert client.post("/raw", content=_chunks(LIMIT)).json() == {"n": LIMIT}
    text = "y" * (LIMIT - 20)
    assert client.post("/json", json={"text": text}).json() == {"n": len(text)}
