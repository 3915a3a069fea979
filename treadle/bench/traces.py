"""What trace capture costs: chat completions through a deployment over real HTTP, with token-exact traces
stored (the default) vs not stored, in the same server and the same run. Rounds alternate on/off (ABBA order)
so drift on a shared machine falls on both sides; the ratio is throughput with capture / without."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from treadle.bench.runner import Row

TARGET = 0.95  # ≤ 5 % overhead
KEY = "tml-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _InProcessServer:
    """`treadle serve`'s app under uvicorn in a thread, so the bench can switch capture between rounds."""

    def __init__(self, model: str, data_dir: str) -> None:
        import uvicorn

        from treadle.server import ServerConfig, build_app

        port = _free_port()
        self.app = build_app(ServerConfig(port=port, models=[model], data_dir=Path(data_dir)))
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> _InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 600
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


def _round(url: str, model: str, n_requests: int, concurrency: int, max_tokens: int) -> float:
    """Seconds for `n_requests` chat completions (every other one streamed), `concurrency` at a time."""

    def one(i: int) -> None:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"Write a short note number {i % 7}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": i % 2 == 1,
            "user": "bench",
        }
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
            if body["stream"]:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for _ in r.iter_bytes():
                        pass
            else:
                c.post("/v1/chat/completions", json=body).raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    return time.perf_counter() - t0


def _store_write_ms(deployments: Any, trace: dict[str, Any], n: int = 50) -> float:
    """Median time to store one copy of a served trace, through the same path a response takes."""
    from treadle.service.traces import ServedBy, TraceRecord

    served = ServedBy("bench", "bench-copy", 1, trace["model_path"], trace["base_model"])
    fields = {k: trace[k] for k in TraceRecord.__dataclass_fields__ if k != "completion_id"}
    times = []
    for i in range(n):
        rec = TraceRecord(completion_id=f"copy-{i}-{trace['completion_id']}", **fields)
        t0 = time.perf_counter()
        deployments.traces.record(served, [rec])
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def bench_traces(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    # Many short rounds rather than a few long ones: on a shared machine the load drifts over tens of seconds,
    # and short rotated rounds put that drift on every side alike.
    rounds, n_requests, concurrency, max_tokens = (4, 8, 4, 8) if quick else (12, 16, 8, 16)
    # Three sides, in a rotating order each round so drift on a shared machine falls on all of them:
    # the deployment with capture on / off, and the base model called directly (no deployment at all).
    sides = ["on", "off", "direct"]
    seconds = dict.fromkeys(sides, 0.0)
    with (
        tempfile.TemporaryDirectory(prefix="treadle-bench-traces-") as tmp,
        _InProcessServer(model, tmp) as srv,
    ):
        deployments = srv.app.state.deployments
        api = httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=600)
        api.post("/api/v1/deployments", json={"name": "bench-bot", "model_path": model}).raise_for_status()
        for target in ("bench-bot", model):  # warm-up, not counted: first-call costs land on neither side
            _round(srv.url, target, 2 * concurrency, concurrency, max_tokens)
        for r in range(rounds):
            for side in sides[r % 3 :] + sides[: r % 3]:
                deployments.traces.capture = side != "off"
                target = model if side == "direct" else "bench-bot"
                took = _round(srv.url, target, n_requests, concurrency, max_tokens)
                seconds[side] += took
                print(f"round {r + 1}/{rounds} {side:>6}: {n_requests / took:.2f} req/s", flush=True)
        deployments.traces.capture = True
        listed = api.get("/api/v1/traces", params={"deployment": "bench-bot", "limit": 1000}).json()["traces"]
        stored = len(listed)
        api.close()
        write_ms = _store_write_ms(deployments, listed[-1])
    n = rounds * n_requests
    rate = {side: n / seconds[side] for side in sides}
    print(
        f"{n} requests per side ({concurrency} concurrent, {max_tokens} tokens, half streamed): "
        f"capture on {rate['on']:.2f} req/s, off {rate['off']:.2f} req/s, base model directly "
        f"{rate['direct']:.2f} req/s; capture overhead {100 * (1 - rate['on'] / rate['off']):.1f}% "
        f"(target ≤ {100 * (1 - TARGET):.0f}%); traces stored: {stored}"
    )
    latency_s = seconds["off"] / n * concurrency  # Little's law: mean time a response is in flight
    print(
        f"storing one trace (the write each traced response waits for): {write_ms:.2f} ms median, "
        f"{100 * write_ms / 1e3 / latency_s:.2f}% of a response's mean latency ({latency_s:.2f} s) without capture"
    )
    rows = [
        Row("chat via deployment: traces on vs off", rate["on"], rate["off"], "req/s", TARGET),
        Row("chat via deployment (traced) vs base model", rate["on"], rate["direct"], "req/s", TARGET),
    ]
    extra: dict[str, object] = {
        "requests_per_side": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "traces_stored": stored,
        "seconds": seconds,
        "store_write_ms": write_ms,
    }
    return rows, extra
