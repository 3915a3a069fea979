"""Protocol overhead: the same small forward through SDK → `treadle serve` vs the in-process engine call, and
64 concurrent `num_samples=1` sample requests through the SDK vs the in-process sampler."""

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
    sdk_forward_s: list[float]
    local_forward_s: list[float]
    sdk_samples_s: float
    local_samples_s: float


def _measure(model: str, tokens: list[int], n_fwd: int, n_samples: int, new: int) -> ApiResult:
    """The same work through the SDK → `treadle serve` and on an in-process Engine. The forwards alternate
    (SDK, in-process, SDK, …) so both see the same machine state; the concurrent samples run one side at a time."""
    import tinker
    from tinker import types

    engine = Engine(model)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = _start_server(model, data_dir)
        try:
            service = tinker.ServiceClient(
                base_url=url, api_key=os.environ.get("TINKER_API_KEY", "tml-bench")
            )
            tc = service.create_lora_training_client(base_model=model, rank=8).result()
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
                    "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
                },
            )
            engine.create_adapter("bench", LoraConfig(rank=8, seed=0))
            t = torch.tensor(tokens)
            d = Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(len(tokens) - 1)})
            fwd = ForwardBackwardRequest("bench", [d], "cross_entropy", forward_only=True)
            sdk_lat, local_lat = [], []
            for i in range(n_fwd + 3):
                a = _timed(lambda: tc.forward([datum], "cross_entropy").result())
                b = _timed(lambda: engine.forward_backward([fwd]))
                if i >= 3:
                    sdk_lat.append(a)
                    local_lat.append(b)

            sc = service.create_sampling_client(base_model=model).result()
            params = types.SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=[])
            prompt = types.ModelInput.from_ints(tokens)
            t_sdk = _concurrent(n_samples, lambda: sc.sample(prompt, 1, params).result())
        finally:
            proc.terminate()
            proc.wait(30)
    try:
        sp = SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=())
        t_local = _concurrent(n_samples, lambda: engine.generate(SampleRequest(None, tokens, sp)))
    finally:
        engine.close()
    return ApiResult(sdk_lat, local_lat, t_sdk, t_local)


def bench_api(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    n_fwd, n_samples, new = (10, 16, 8) if quick else (60, 64, 16)
    tokens = list(range(100, 116))
    r = _measure(model, tokens, n_fwd, n_samples, new)
    p50_sdk = statistics.median(r.sdk_forward_s) * 1e3
    p50_local = statistics.median(r.local_forward_s) * 1e3
    paired = statistics.median(a - b for a, b in zip(r.sdk_forward_s, r.local_forward_s, strict=True)) * 1e3
    added = p50_sdk - p50_local
    print(
        f"forward p50: SDK {p50_sdk:.1f} ms, in-process {p50_local:.1f} ms, added {added:.1f} ms "
        f"(median of paired differences {paired:.1f} ms; target ≤ 10 ms)"
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
            0.8,
        ),
    ]
    extra: dict[str, object] = {
        "forward_p50_ms": {"sdk": p50_sdk, "in_process": p50_local, "added": added, "paired_added": paired}
    }
    return rows, extra
