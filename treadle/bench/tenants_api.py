"""Many tenants through the SDK against a `treadle serve` subprocess: 8 training clients submitting at once vs
one after another, the 46-token step latency (and its fraction of the GEMM peak), and what a client that
computes with torch itself costs the server with and without `treadle.client_threads.limit_client_threads`.

Client-thread rows run each client in a fresh subprocess (a plain `import torch` script vs one that calls
the helper first), alternating, so both see the same server and machine state.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from treadle.bench.api import _start_server
from treadle.bench.runner import Row

N_CLIENTS = 8
STEP_TOKENS = 46


def _datum(types: Any, tokens: list[int]) -> Any:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
        },
    )


def _batch(types: Any, rows: int, seq: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [_datum(types, [int(t) for t in rng.integers(100, 40000, seq + 1)]) for _ in range(rows)]


def _step(tc: Any, data: list[Any], types: Any) -> None:
    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=1e-4))
    fb.result()
    op.result()


def _tenants(service: Any, model: str, types: Any, repeat: int) -> tuple[float, float]:
    clients = [
        service.create_lora_training_client(base_model=model, rank=16).result() for _ in range(N_CLIENTS)
    ]
    data = [_batch(types, 1, 32, seed=i) for i in range(N_CLIENTS)]

    def concurrent() -> None:
        with ThreadPoolExecutor(N_CLIENTS) as ex:
            list(ex.map(lambda i: _step(clients[i], data[i], types), range(N_CLIENTS)))

    def serial() -> None:
        for i in range(N_CLIENTS):
            _step(clients[i], data[i], types)

    concurrent()
    serial()
    t_con, t_ser = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        concurrent()
        t_con.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        serial()
        t_ser.append(time.perf_counter() - t0)
    return statistics.median(t_con), statistics.median(t_ser)


def _latency(service: Any, model: str, types: Any, rows: int, repeat: int) -> float:
    tc = service.create_lora_training_client(base_model=model, rank=16).result()
    data = _batch(types, rows, STEP_TOKENS, seed=99)
    _step(tc, data, types)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _step(tc, data, types)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# A client script as users write them: torch imported first, some torch compute between steps (advantages,
# rewards), SFT steps through the SDK. argv: url, model, "limited" | "plain", steps, rows, seq.
_CLIENT = textwrap.dedent(
    """
    import sys, time
    url, model, mode, steps, rows, seq = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
    if mode == "limited":
        from treadle.client_threads import limit_client_threads
        limit_client_threads()
    import numpy as np
    import torch
    import tinker
    from tinker import types
    rng = np.random.default_rng(0)
    def datum(t):
        return types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(t[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(t) - 1, dtype=np.float32))})
    data = [datum([int(x) for x in rng.integers(100, 40000, seq + 1)]) for _ in range(rows)]
    tc = tinker.ServiceClient(base_url=url, api_key="tml-bench").create_lora_training_client(
        base_model=model, rank=16).result()
    a = torch.randn(384, 384)
    spent = 0.0
    for i in range(steps + 1):
        for _ in range(20):  # the script's own torch work between steps
            a = torch.tanh(a @ a.T / 384)
        t0 = time.perf_counter()
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        if i:  # the first step warms up
            spent += time.perf_counter() - t0
    print(rows * seq * steps / spent)
    """
)


def _client_run(url: str, model: str, mode: str, steps: int, rows: int, seq: int) -> float:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_NUM_THREADS") and k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    env["TINKER_API_KEY"] = "tml-bench"
    out = subprocess.run(
        [sys.executable, "-c", _CLIENT, url, model, mode, str(steps), str(rows), str(seq)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def bench_tenants_api(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    import tinker
    from tinker import types

    from treadle.client_threads import limit_client_threads

    repeat = 2 if quick else 3
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = _start_server(model, data_dir)  # started first: it must not inherit the client's cap
        try:
            limit_client_threads()  # this process is a client here: it must not compete with the server
            service = tinker.ServiceClient(
                base_url=url, api_key=os.environ.get("TINKER_API_KEY", "tml-bench")
            )
            t_con, t_ser = _tenants(service, model, types, repeat)
            print(
                f"{N_CLIENTS} clients x (1x32) fwd+bwd+optim: concurrent {t_con:.2f} s, serial {t_ser:.2f} s"
            )
            rows = [
                Row(
                    f"SDK: {N_CLIENTS} training clients concurrent vs serial",
                    1 / t_con,
                    1 / t_ser,
                    "1/s",
                    1.2,
                )
            ]
            extra: dict[str, object] = {"tenants_s": {"concurrent": t_con, "serial": t_ser}}
            n_params = 135e6  # the FLOP model for the default model: 4 x 135M x tokens per step
            for n_rows, target in ((1, 0.30), (8, 1.35)):
                t = _latency(service, model, types, n_rows, repeat + 2)
                gflops = 4 * n_params * STEP_TOKENS * n_rows / t / 1e9
                print(
                    f"SDK {n_rows}x{STEP_TOKENS}-token step: {t * 1e3:.0f} ms, {gflops:.1f} GFLOP/s = {gflops / 175:.0%} of 175"
                )
                rows.append(
                    Row(
                        f"SDK {n_rows}x{STEP_TOKENS}-token step vs {target} s target",
                        1 / t,
                        1 / target,
                        "1/s",
                        1.0,
                    )
                )
                extra[f"step_{n_rows}x{STEP_TOKENS}_s"] = t
            steps, n_rows, seq = (2, 4, 64) if quick else (3, 8, 64)
            plain, limited = [], []
            for _ in range(2):
                plain.append(_client_run(url, model, "plain", steps, n_rows, seq))
                limited.append(_client_run(url, model, "limited", steps, n_rows, seq))
            p, lim = statistics.median(plain), statistics.median(limited)
            print(f"computing client: plain {plain} tok/s, limit_client_threads {limited} tok/s")
            rows.append(
                Row(f"SDK SFT {n_rows}x{seq}, computing client: limited vs plain", lim, p, "tok/s", 1.0)
            )
            extra["client_threads_tok_s"] = {"plain": plain, "limited": limited}
        finally:
            proc.terminate()
            proc.wait(30)
    return rows, extra
