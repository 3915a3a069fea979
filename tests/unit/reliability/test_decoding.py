"""Regression tests for the fuzz findings in the one place bodies are decoded and errors mapped: bodies that are
not UTF-8 (a 500 `UnicodeDecodeError` before), NaN/Infinity literals, integers past int64 or past Python's
4300-digit conversion, nesting past the parser's recursion limit, the router's bare `Not Found` /
`Method Not Allowed`, and signed-URL tokens whose expiry `str.isdigit()` accepted but `int()` refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from treadle.api.decoding import check_number, json_object, json_value
from treadle.api.errors import install_error_handlers
from treadle.errors import UserError
from treadle.service.export import UrlSigner


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xff{}", "not UTF-8 (byte 0xff at position 0)"),
        (b'{"a": "\xc3\x28"}', "not UTF-8"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"a": ' + b"9" * 5000 + b"}", "body: "),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ', "not valid JSON"),
    ],
)
def test_malformed_bodies_name_the_body(body: bytes, says: str) -> None:
    with pytest.raises(UserError) as e:
        json_value(body)
    assert e.value.field == "body" and e.value.message.startswith("body: ") and says in e.value.message


def test_valid_bodies_decode() -> None:
    assert json_value(b"") == {}
    assert json_object('{"name": "café", "n": 9223372036854775807}'.encode()) == {
        "name": "café",
        "n": 2**63 - 1,
    }
    with pytest.raises(UserError, match="body: must be a JSON object, got list"):
        json_object(b"[1]")


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**400, float("nan"), float("inf")])
def test_numbers_out_of_range_name_the_field(value: float) -> None:
    with pytest.raises(UserError) as e:
        check_number("seq_id", value)
    assert e.value.field == "seq_id" and e.value.message.startswith("seq_id: must be")


def test_numbers_in_range_pass() -> None:
    for v in (0, -(2**63), 2**63 - 1, 1e308, True, "text"):
        check_number("x", v)


def test_router_refusals_name_path_and_method() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/op")
    async def op(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    with TestClient(app) as c:
        r = c.get("/nope/../x")
        assert r.status_code == 404 and r.json()["detail"].startswith("path: no route GET")
        r = c.get("/op")
        assert r.status_code == 405 and r.json()["detail"].startswith("method: GET is not allowed")
        assert r.headers["allow"] == "POST"


@pytest.mark.parametrize("exp", ["²³", "9" * 5000, "-1", "", "１２３"])
def test_signed_url_tokens_with_odd_expiry_are_refused(tmp_path: Path, exp: str) -> None:
    signer = UrlSigner(tmp_path / "key")
    assert not signer.verify("run/weights/a/f", exp + ".AAAA", time.time())


def test_signed_urls_expire_and_cannot_be_altered(tmp_path: Path) -> None:
    signer = UrlSigner(tmp_path / "key")
    now = time.time()
    token = signer.sign("run/weights/a/f", int(now) + 60)
    assert signer.verify("run/weights/a/f", token, now)
    assert not signer.verify("run/weights/a/f", token, now + 61)  # expired
    assert not signer.verify("run/weights/b/f", token, now)  # another file
    exp, mac = token.split(".")
    assert not signer.verify("run/weights/a/f", f"{int(exp) + 3600}.{mac}", now)  # expiry extended
    assert not signer.verify(
        "run/weights/a/f", f"{exp}.{mac[:-1]}{'B' if mac.endswith('A') else 'A'}", now
    )  # signature altered
