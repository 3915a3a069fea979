"""Protocol overhead: the same small forward through SDK → `treadle serve` vs the in-process engine call, and
64 concurrent `num_samples=1` sample requests through the SDK vs the in-process sampler."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def _start_server(model: str, data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
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


def _timed_calls(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    out = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _through_sdk(
    model: str, tokens: list[int], n_fwd: int, n_samples: int, new: int
) -> tuple[list[float], float]:
    """Forward latencies and the wall time of `n_samples` concurrent samples, SDK → `treadle serve`."""
    import tinker
    from tinker import types

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
            lat = _timed_calls(lambda: tc.forward([datum], "cross_entropy").result(), n_fwd)
            sc = service.create_sampling_client(base_model=model).result()
            params = types.SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=[])
            prompt = types.ModelInput.from_ints(tokens)

            def samples() -> None:
                with ThreadPoolExecutor(n_samples) as ex:
                    list(ex.map(lambda _: sc.sample(prompt, 1, params).result(), range(n_samples)))

            return lat, statistics.median(_timed_calls(samples, 1, warmup=1))
        finally:
            proc.terminate()
            proc.wait(30)


def _in_process(
    model: str, tokens: list[int], n_fwd: int, n_samples: int, new: int
) -> tuple[list[float], float]:
    """The same work on an in-process Engine."""
    engine = Engine(model)
    try:
        engine.create_adapter("bench", LoraConfig(rank=8, seed=0))
        t = torch.tensor(tokens)
        d = Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(len(tokens) - 1)})
        fwd = ForwardBackwardRequest("bench", [d], "cross_entropy", forward_only=True)
        lat = _timed_calls(lambda: engine.forward_backward([fwd]), n_fwd)
        sp = SamplingParams(max_tokens=new, temperature=1.0, seed=1, stop=())

        def samples() -> None:
            for f in [engine.sample(SampleRequest(None, tokens, sp)) for _ in range(n_samples)]:
                f.result()

        return lat, statistics.median(_timed_calls(samples, 1, warmup=1))
    finally:
        engine.close()


def bench_api(model: str, *, quick: bool = False) -> list[Row]:
    n_fwd, n_samples, new = (10, 16, 8) if quick else (30, 64, 16)
    tokens = list(range(100, 116))
    sdk_lat, t_sdk = _through_sdk(model, tokens, n_fwd, n_samples, new)
    local_lat, t_local = _in_process(model, tokens, n_fwd, n_samples, new)
    p50_sdk, p50_local = statistics.median(sdk_lat) * 1e3, statistics.median(local_lat) * 1e3
    print(
        f"forward p50: SDK {p50_sdk:.1f} ms, in-process {p50_local:.1f} ms, "
        f"added {p50_sdk - p50_local:.1f} ms (target ≤ 10 ms)"
    )
    return [
        # latency as a rate so it reads like the other rows (higher is better)
        Row("small forward: SDK vs in-process (1/p50 ms)", 1e3 / p50_sdk, 1e3 / p50_local, "1/s", 0.0),
        Row(
            f"{n_samples} concurrent samples: SDK vs in-process",
            n_samples / t_sdk,
            n_samples / t_local,
            "req/s",
            0.8,
        ),
    ]
