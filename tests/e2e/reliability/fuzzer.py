"""The hostile-input fuzzer: a table of every route the server answers (Tinker JSON + protobuf, REST, OpenAI),
hypothesis strategies that build malformed requests for them (wrong types, missing and extra fields, extreme
numbers, NaN/Inf, huge strings, deep nesting, invalid UTF-8, garbage protobuf, lying Content-Type and
Content-Encoding, traversal in path ids, anonymous and foreign keys), and the check every answer must pass:
below 500, a complete response, and a 4xx that names the field it refuses.

Used by tests/e2e/reliability/test_fuzz_routes.py (CI: >= 10^4 requests, seeded) and scripts/fuzz_long.sh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

# A 4xx names what it refuses: `field: message` (Tinker `detail`) or OpenAI's `error.message` / `error.param`.
_NAMED = re.compile(r"^[A-Za-z_][\w.\[\]\-/ ]{0,80}:")


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    template: str  # with {placeholders} filled from ids
    body: str  # "json" | "proto" | "none"
    fields: tuple[str, ...] = ()


TINKER = "/api/v1"
ROUTES: tuple[Route, ...] = (
    Route("POST", f"{TINKER}/retrieve_future", "json", ("request_id",)),
    Route("POST", f"{TINKER}/retrieve_futures", "json", ("target", "prev_cursor", "timeout")),
    Route("POST", f"{TINKER}/cancel_future", "json", ("request_id",)),
    Route(
        "POST",
        f"{TINKER}/create_model",
        "json",
        ("session_id", "model_seq_id", "base_model", "lora_config", "optimizer_config", "user_metadata"),
    ),
    Route("POST", f"{TINKER}/get_info", "json", ("model_id",)),
    Route("POST", f"{TINKER}/forward_backward", "proto", ()),
    Route("POST", f"{TINKER}/optim_step", "json", ("model_id", "seq_id", "adam_params")),
    Route(
        "POST",
        f"{TINKER}/create_sampling_session",
        "json",
        ("session_id", "sampling_session_seq_id", "base_model", "model_path"),
    ),
    Route("GET", f"{TINKER}/samplers/{{sampler_id}}", "none"),
    Route(
        "POST",
        f"{TINKER}/asample",
        "json",
        (
            "sampling_session_id",
            "seq_id",
            "prompt",
            "sampling_params",
            "num_samples",
            "prompt_logprobs",
            "topk_prompt_logprobs",
        ),
    ),
    Route("POST", f"{TINKER}/client/config", "json"),
    Route("POST", f"{TINKER}/client/dynamic_config", "json"),
    Route("POST", f"{TINKER}/create_session", "json", ("tags", "user_metadata")),
    Route("POST", f"{TINKER}/session_heartbeat", "json", ("session_id",)),
    Route("POST", f"{TINKER}/sessions/{{session_id}}/finish", "none"),
    Route("GET", f"{TINKER}/sessions", "none"),
    Route("GET", f"{TINKER}/sessions/{{session_id}}", "none"),
    Route("POST", f"{TINKER}/telemetry", "json", ("events",)),
    Route("GET", f"{TINKER}/healthz", "none"),
    Route("GET", f"{TINKER}/get_server_capabilities", "none"),
    Route("GET", f"{TINKER}/auth/apikey/me", "none"),
    Route(
        "POST",
        f"{TINKER}/save_weights",
        "json",
        ("model_id", "seq_id", "path", "overwrite", "ttl_seconds", "user_metadata"),
    ),
    Route(
        "POST",
        f"{TINKER}/save_weights_for_sampler",
        "json",
        ("model_id", "seq_id", "path", "sampling_session_seq_id"),
    ),
    Route(
        "POST",
        f"{TINKER}/save_weights_external",
        "json",
        ("model_id", "seq_id", "path", "ttl_seconds", "age_encryption_recipients"),
    ),
    Route(
        "POST",
        f"{TINKER}/load_weights",
        "json",
        ("model_id", "seq_id", "path", "optimizer", "session_id", "model_seq_id", "user_metadata"),
    ),
    Route("GET", f"{TINKER}/training_runs", "none"),
    Route("GET", f"{TINKER}/training_runs/{{run_id}}", "none"),
    Route("GET", f"{TINKER}/training_runs/{{run_id}}/checkpoints", "none"),
    Route("GET", f"{TINKER}/checkpoints", "none"),
    Route("GET", f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}", "none"),
    Route("DELETE", f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}", "none"),
    Route("POST", f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/publish", "none"),
    Route("DELETE", f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/publish", "none"),
    Route(
        "PUT",
        f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/ttl",
        "json",
        ("ttl_seconds",),
    ),
    Route(
        "GET",
        f"{TINKER}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/external_weights_urls",
        "none",
    ),
    Route("GET", f"{TINKER}/blobs/{{token}}/{{rel}}", "none"),
    Route("POST", f"{TINKER}/weights_info", "json", ("tinker_path",)),
    Route("POST", f"{TINKER}/copy_weights", "json", ("source_path", "ttl_seconds")),
    Route("GET", "/v1/models", "none"),
    Route("GET", "/v1/models/{model}", "none"),
    Route(
        "POST",
        "/v1/chat/completions",
        "json",
        (
            "model",
            "messages",
            "max_tokens",
            "n",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "stream",
            "logprobs",
        ),
    ),
    Route(
        "POST",
        "/v1/completions",
        "json",
        ("model", "prompt", "max_tokens", "n", "temperature", "top_p", "stop", "seed", "stream", "logprobs"),
    ),
)
PLACEHOLDERS = ("sampler_id", "session_id", "run_id", "kind", "name", "token", "rel", "model")


@dataclasses.dataclass
class Ids:
    """Real identifiers on the server, so that fuzzed requests also reach the checks behind the lookups."""

    values: dict[str, list[str]]
    strategies: dict[str, st.SearchStrategy[Any]] = dataclasses.field(default_factory=dict)

    def pool(self, name: str) -> list[str]:
        return self.values.get(name, []) or ["x"]


HOSTILE_IDS = [
    "",
    "..",
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e",
    "weights/../../x",
    "a\x00b",
    "' OR 1=1 --",
    '"; DROP TABLE runs; --',
    "tinker://../../x/weights/y",
    "tinker://run/weights/..",
    "²³.abc",
    "-1",
    "1e400",
    "NaN",
    "ckpt0",
    "💥",
    "\ud800",
    "%ff%fe",
    "a b",
    "a?b=c",
    "a#b",
]

# Long ids are built when drawn: as literals they would bloat every strategy's repr.
HUGE_IDS = st.builds(
    lambda n, c, tail: c * n + tail,
    st.integers(300, 6000),
    st.sampled_from("x9/."),
    st.sampled_from(["", ".AAAA"]),
)

EXTREME_NUMBERS = [0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**400, 1e308, -1e308, 1e-320]


@functools.cache
def json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(EXTREME_NUMBERS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(HOSTILE_IDS),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=depth * 4,
    )


def plausible(field: str, ids: Ids) -> st.SearchStrategy[Any]:
    """Values that are right or nearly right for a field, so validation deep inside is reached too."""
    if field not in ids.strategies:
        ids.strategies[field] = _plausible(field, ids)
    return ids.strategies[field]


def _plausible(field: str, ids: Ids) -> st.SearchStrategy[Any]:
    pools = {
        "session_id": "session_id",
        "model_id": "model_id",
        "request_id": "request_id",
        "sampling_session_id": "sampler_id",
        "base_model": "base_model",
        "model_path": "tinker_path",
        "path": "tinker_path",
        "tinker_path": "tinker_path",
        "source_path": "tinker_path",
        "model": "model",
    }
    options: list[st.SearchStrategy[Any]] = [json_values(2)]
    if field in pools:
        options.append(st.sampled_from(ids.pool(pools[field])))
    if field.endswith(("seq_id", "num_samples", "max_tokens", "n", "topk_prompt_logprobs", "prev_cursor")):
        options.append(st.one_of(st.integers(-3, 50), st.sampled_from(EXTREME_NUMBERS)))
    if field in ("ttl_seconds", "timeout", "temperature", "top_p"):
        options.append(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**12)))
    if field == "prompt":
        toks = st.lists(st.one_of(st.integers(-5, 300), st.sampled_from(EXTREME_NUMBERS)), max_size=8)
        options.append(st.builds(lambda t: {"chunks": [{"type": "encoded_text", "tokens": t}]}, toks))
        options.append(st.one_of(st.text(max_size=30), toks))
    if field == "sampling_params":
        options.append(
            st.fixed_dictionaries(
                {},
                optional={
                    "max_tokens": st.one_of(st.integers(-2, 40), st.sampled_from(EXTREME_NUMBERS)),
                    "temperature": st.floats(allow_nan=True, allow_infinity=True),
                    "top_p": st.floats(allow_nan=True, allow_infinity=True),
                    "top_k": st.one_of(st.integers(-5, 500), st.sampled_from(EXTREME_NUMBERS)),
                    "seed": st.one_of(st.integers(), st.sampled_from(EXTREME_NUMBERS)),
                    "stop": json_values(1),
                },
            )
        )
    if field == "messages":
        msg = st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
                "content": json_values(1),
            }
        )
        options.append(st.lists(msg, max_size=3))
    if field == "target":
        options.append(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["sampling_session", "x"]),
                    "sampling_session_id": st.sampled_from(ids.pool("sampler_id")),
                }
            )
        )
    if field == "lora_config":
        options.append(
            st.fixed_dictionaries({"rank": st.one_of(st.integers(-2, 300), st.sampled_from(EXTREME_NUMBERS))})
        )
    return st.one_of(*options)


@st.composite
def json_body(draw: st.DrawFn, route: Route, ids: Ids) -> bytes:
    obj: dict[str, Any] = {}
    for f in route.fields:
        if draw(st.integers(0, 4)) > 0:  # sometimes missing
            obj[f] = draw(plausible(f, ids))
    if draw(st.integers(0, 5)) == 0:
        obj.update(draw(st.dictionaries(st.text(max_size=10), json_values(1), max_size=3)))  # extra fields
    shape = draw(st.integers(0, 19))
    if shape == 0:
        return draw(st.binary(max_size=64))  # garbage
    if shape == 1:
        raw = json.dumps(obj).encode()
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut]  # truncated JSON
    if shape == 2:
        raw = json.dumps(obj).encode()
        at = draw(st.integers(0, len(raw)))
        return (
            raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"])) + raw[at:]
        )
    if shape == 3:
        depth = draw(st.integers(50, 5000))
        return b"[" * depth + b"]" * depth  # deep nesting
    if shape == 4:
        return json.dumps(draw(json_values(3))).encode()  # not an object
    if shape == 5:
        return json.dumps(
            {f: "x" * draw(st.integers(10_000, 200_000)) for f in route.fields[:2]} or {"a": "x"}
        ).encode()
    if shape == 6:
        return json.dumps(obj, ensure_ascii=False).encode("utf-16")  # a different encoding
    return json.dumps(obj).encode()  # NaN / Infinity literals pass through json.dumps


@st.composite
def proto_body(draw: st.DrawFn, ids: Ids) -> bytes:
    from tinker.proto import tinker_public_pb2 as pb

    shape = draw(st.integers(0, 5))
    if shape == 0:
        return draw(st.binary(max_size=200))
    msg = pb.ForwardBackwardRequest()
    msg.model_id = draw(_path_value("model_id", ids))
    msg.seq_id = draw(st.integers(0, 2**31 - 1))
    msg.loss_fn = draw(st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "bogus", ""]))
    for _ in range(draw(st.integers(0, 3))):
        d = msg.data.add()
        chunk = d.model_input.add()
        chunk.encoded_text.tokens = draw(st.binary(max_size=40))
        for name in draw(
            st.lists(st.sampled_from(["target_tokens", "weights", "advantages", "logprobs", "x"]), max_size=3)
        ):
            t = d.loss_fn_inputs[name]
            t.dtype = draw(st.integers(0, 5))  # type: ignore[assignment]
            t.shape.extend(draw(st.lists(st.integers(-3, 2**40), max_size=3)))
            t.dense = draw(st.binary(max_size=40))
    raw = msg.SerializeToString()
    if shape == 1 and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]  # truncated
    if shape == 2:
        return raw + draw(st.binary(min_size=1, max_size=20))  # trailing garbage
    return raw


def _path_value(name: str, ids: Ids) -> st.SearchStrategy[str]:
    key = "path:" + name
    if key not in ids.strategies:
        ids.strategies[key] = st.one_of(
            st.sampled_from(ids.pool(name)), st.sampled_from(HOSTILE_IDS), HUGE_IDS, st.text(max_size=12)
        )
    return ids.strategies[key]


def fill(template: str, draw: st.DrawFn, ids: Ids) -> str:
    out = template
    for name in PLACEHOLDERS:
        token = "{" + name + "}"
        if token in out:
            value = draw(_path_value(name, ids))
            safe = draw(
                st.sampled_from(["", "/", "/.%:"])
            )  # sometimes raw '/', '..' and '%' reach the router
            out = out.replace(token, quote(value.encode("utf-8", "surrogatepass"), safe=safe))
    return out


CONTENT_TYPES = [
    None,
    "application/json",
    "application/x-protobuf",
    "text/plain",
    "application/json; charset=latin-1",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "garbage/\x7f",
]
CONTENT_ENCODINGS = [None, None, None, "gzip", "zstd", "br", "deflate", "identity", "bogus"]


@dataclasses.dataclass(frozen=True)
class Probe:
    method: str
    path: str
    headers: dict[str, str]
    content: bytes | None


@st.composite
def probes(draw: st.DrawFn, ids: Ids, keys: list[str | None]) -> Probe:
    route = draw(st.sampled_from(ROUTES))
    method = (
        route.method
        if draw(st.integers(0, 15))
        else draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    )
    path = fill(route.template, draw, ids)
    if draw(st.integers(0, 9)) == 0:
        query = draw(
            st.dictionaries(
                st.sampled_from(["limit", "offset", "status", "x"]),
                st.sampled_from(["-1", "abc", "1e9", "99999999999999999999", "", "active"]),
                max_size=2,
            )
        )
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    headers: dict[str, str] = {}
    key = draw(st.sampled_from(keys))
    if key is not None:
        headers["X-API-Key"] = key
    if route.body == "proto":
        content: bytes | None = (
            draw(proto_body(ids)) if draw(st.integers(0, 4)) else draw(json_body(route, ids))
        )
        ctype = "application/x-protobuf" if draw(st.integers(0, 3)) else draw(st.sampled_from(CONTENT_TYPES))
    elif route.body == "json":
        content = draw(json_body(route, ids))
        ctype = "application/json" if draw(st.integers(0, 3)) else draw(st.sampled_from(CONTENT_TYPES))
    else:
        content = None if draw(st.integers(0, 5)) else draw(st.binary(max_size=40))
        ctype = draw(st.sampled_from(CONTENT_TYPES))
    if ctype is not None:
        headers["Content-Type"] = ctype
    enc = draw(st.sampled_from(CONTENT_ENCODINGS))
    if enc is not None:
        headers["Content-Encoding"] = enc
    return Probe(method, path, headers, content)


def problem(resp: httpx.Response) -> str | None:
    """Why this answer breaks the contract, or None: < 500, and every 4xx a JSON error naming a field."""
    if resp.status_code >= 500:
        return f"{resp.status_code}: {resp.text[:300]}"
    if resp.status_code < 400 or resp.status_code == 408:  # 408: a pending future, re-polled (protocol §4.2)
        return None
    try:
        body = resp.json()
    except ValueError:
        return f"{resp.status_code} without a JSON body: {resp.text[:200]!r}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI shape
        message = str(body["error"].get("message") or "")
    else:
        message = str(body.get("detail") or "") if isinstance(body, dict) else ""
    if not _NAMED.match(message):
        return f"{resp.status_code} does not name a field: {message[:200]!r}"
    return None


def printable(s: str) -> bool:
    return all(c in string.printable for c in s)
