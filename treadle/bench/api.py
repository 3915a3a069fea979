"""Protocol and placement overhead: the same small forward, and 64 concurrent `num_samples=1` sample requests,
three ways in one run — through the SDK to `treadle serve` with its default worker process, through the SDK to
`treadle serve --in-process` (engine inside the server), and on an in-process `Engine` (no HTTP at all).

The forwards alternate (worker process, in-server, engine, …) so all three see the same machine state; the
concurrent samples run one side at a time. Rows: SDK with a worker process vs the in-process engine (the issue
12 targets: ≤ 10 ms added p50, ≥ 0.9× samples), and worker process vs in-server (what the process hop alone
costs)."""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

from treadle.bench.runner import Row
from treadle.engine.engine import Engine
from treadle.engine.types import Datum, ForwardBackwardRequest, LoraConfig, SampleRequest, SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(
    model: str, data_dir: str, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "treadle.cli",
            "serve",
            "--port",
            str(port),
            "--model",
            model,
            "--data-dir",
            data_dir,
            *extra_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("treadle serve exited during start-up")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("treadle serve did not become healthy in 300 s")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _concurrent(n: int, fn: Callable[[], object]) -> float:
    """Wall seconds for `n` concurrent calls of `fn` (one warm-up round first)."""
    with ThreadPoolExecutor(n) as ex:
        for _ in range(2):
            t0 = time.perf_counter()
            list(ex.map(lambda _: fn(), range(n)))
    return time.perf_counter() - t0


@dataclasses.dataclass
class ApiResult:
    sdk_forward_s: list[float]  # SDK → serve, engine in a worker process (the default)
    inserver_forward_s: list[float]  # SDK → serve --in-process
    local_forward_s: list[float]  # Engine call in this process
    sdk_samples_s: float
    inserver_samples_s: float
    local_samples_s: float


class _Client:
    """A training client and a base-model sampler on one server, through the official SDK."""

    def __init__(self, url: str, model: str, tokens: list[int]) -> None:
        import tinker
        from tinker import types

        service = tinker.ServiceClient(base_url=url, api_key=os.environ.get("TINKER_API_KEY", "tml-bench"))
        self.tc = service.create_lora_training_client(base_model=model, rank=8).result()
        self.sc = service.create_sampling_client(base_model=model).result()
        self.datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
                "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
            },
        )
        self.prompt = types.ModelInput.from_ints(tokens)
        self.types = types

    def forward(self) -> object:
        return self.tc.forward([self.datum], "cross_entropy").result()

    def sample(self, new: int) -> object:
        params = self.types.SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=[])
        return self.sc.sample(self.prompt, 1, params).result()


def _measure(model: str, tokens: list[int], n_fwd: int, n_samples: int, new: int) -> ApiResult:
    engine = Engine(model)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        try:
            proc, url = _start_server(model, d1)
            procs.append(proc)
            proc, url_in = _start_server(model, d2, ["--in-process"])
            procs.append(proc)
            sub, inserver = _Client(url, model, tokens), _Client(url_in, model, tokens)
            engine.create_adapter("bench", LoraConfig(rank=8, seed=0))
            t = torch.tensor(tokens)
            d = Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(len(tokens) - 1)})
            fwd = ForwardBackwardRequest("bench", [d], "cross_entropy", forward_only=True)
            sdk_lat, in_lat, local_lat = [], [], []
            for i in range(n_fwd + 3):
                a = _timed(sub.forward)
                b = _timed(inserver.forward)
                c = _timed(lambda: engine.forward_backward([fwd]))
                if i >= 3:
                    sdk_lat.append(a)
                    in_lat.append(b)
                    local_lat.append(c)
            t_sdk = _concurrent(n_samples, lambda: sub.sample(new))
            t_in = _concurrent(n_samples, lambda: inserver.sample(new))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    try:
        sp = SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=())
        t_local = _concurrent(n_samples, lambda: engine.generate(SampleRequest(None, tokens, sp)))
    finally:
        engine.close()
    return ApiResult(sdk_lat, in_lat, local_lat, t_sdk, t_in, t_local)


def bench_api(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    n_fwd, n_samples, new = (10, 16, 8) if quick else (60, 64, 16)
    tokens = list(range(100, 116))
    r = _measure(model, tokens, n_fwd, n_samples, new)
    p50_sdk = statistics.median(r.sdk_forward_s) * 1e3
    p50_in = statistics.median(r.inserver_forward_s) * 1e3
    p50_local = statistics.median(r.local_forward_s) * 1e3
    paired = statistics.median(a - b for a, b in zip(r.sdk_forward_s, r.local_forward_s, strict=True)) * 1e3
    added = p50_sdk - p50_local
    print(
        f"forward p50: SDK {p50_sdk:.1f} ms, in-process {p50_local:.1f} ms, added {added:.1f} ms "
        f"(median of paired differences {paired:.1f} ms; target ≤ 10 ms); serve --in-process {p50_in:.1f} ms, "
        f"so the worker-process hop adds {p50_sdk - p50_in:.1f} ms"
    )
    rows = [
        # latency as a rate so it reads like the other rows (higher is better); the target ratio is what
        # exactly 10 ms of added latency would give
        Row(
            "small forward: SDK vs in-process (1/p50 ms)",
            1e3 / p50_sdk,
            1e3 / p50_local,
            "1/s",
            p50_local / (p50_local + 10.0),
        ),
        Row(
            f"{n_samples} concurrent samples: SDK vs in-process",
            n_samples / r.sdk_samples_s,
            n_samples / r.local_samples_s,
            "req/s",
            0.9,
        ),
        Row(
            "small forward: worker process vs serve --in-process (1/p50 ms)",
            1e3 / p50_sdk,
            1e3 / p50_in,
            "1/s",
            p50_in / (p50_in + 10.0),
        ),
        Row(
            f"{n_samples} concurrent samples: worker process vs serve --in-process",
            n_samples / r.sdk_samples_s,
            n_samples / r.inserver_samples_s,
            "req/s",
            0.9,
        ),
    ]
    extra: dict[str, object] = {
        "forward_p50_ms": {
            "sdk_worker_process": p50_sdk,
            "sdk_in_server": p50_in,
            "in_process": p50_local,
            "added": added,
            "paired_added": paired,
        }
    }
    return rows, extra
