"""The soak: SDK training clients (forward_backward / optim_step / save), SDK sampling clients and streaming
OpenAI chat clients against one real server for a while; counts errors and hung futures, records each op's
latency and the server's RSS over time. `run_soak` serves the short CI test (test_soak.py) and scripts/soak.py.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import openai
import tinker
from tinker import types

HANG_S = 300.0  # a future not resolved in this long counts as hung


@dataclasses.dataclass
class SoakReport:
    seconds: float
    ops: dict[str, int]
    errors: list[str]
    hung: int
    latency_ms: dict[str, tuple[float, float]]  # op -> (p50, p99)
    rss_mb: list[tuple[float, float]]  # (seconds since start, MB)

    @property
    def rss_slope_mb_per_min(self) -> float:
        """Least-squares slope of RSS over the second half of the run (after warm-up)."""
        pts = self.rss_mb[len(self.rss_mb) // 2 :]
        if len(pts) < 3:
            return 0.0
        t, m = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        return float(np.polyfit(t / 60.0, m, 1)[0])

    def table(self) -> str:
        lines = [f"{'op':<22}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}"]
        for op in sorted(self.ops):
            p50, p99 = self.latency_ms.get(op, (0.0, 0.0))
            lines.append(f"{op:<22}{self.ops[op]:>8}{p50:>10.1f}{p99:>10.1f}")
        rss = [m for _, m in self.rss_mb]
        lines.append(
            f"errors {len(self.errors)}, hung {self.hung}, RSS {rss[0]:.0f} → {rss[-1]:.0f} MB "
            f"(max {max(rss):.0f}), slope over 2nd half {self.rss_slope_mb_per_min:+.2f} MB/min"
            if rss
            else "no RSS samples"
        )
        return "\n".join(lines)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Soak:
    def __init__(self, base_url: str, api_key: str, model: str, duration_s: float) -> None:
        self.base_url, self.key, self.model = base_url, api_key, model
        self.deadline = time.monotonic() + duration_s
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.hung = 0

    def timed(self, op: str, fn: object) -> object:
        t = time.monotonic()
        out = fn()  # type: ignore[operator]
        with self.lock:
            self.lat[op].append((time.monotonic() - t) * 1000)
        return out

    def guard(self, name: str, body: object) -> None:
        try:
            body()  # type: ignore[operator]
        except TimeoutError as e:
            with self.lock:
                self.hung += 1
                self.errors.append(f"{name}: hung: {e}")
        except Exception as e:
            with self.lock:
                self.errors.append(f"{name}: {type(e).__name__}: {e}"[:300])

    def trainer(self, i: int) -> None:
        svc = tinker.ServiceClient(base_url=self.base_url, api_key=self.key)
        tc = svc.create_lora_training_client(base_model=self.model, rank=4).result(timeout=HANG_S)
        toks = [(i * 11 + k * 5) % 100 + 1 for k in range(8)]
        d = types.Datum(
            model_input=types.ModelInput.from_ints(toks[:-1]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
        )
        step = 0
        while time.monotonic() < self.deadline:
            self.timed(
                "forward_backward", lambda: tc.forward_backward([d], "cross_entropy").result(timeout=HANG_S)
            )
            self.timed(
                "optim_step",
                lambda: tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=HANG_S),
            )
            step += 1
            if step % 5 == 0:
                name = f"soak-{i}-{step}"
                self.timed("save_state", lambda n=name: tc.save_state(n).result(timeout=HANG_S))
            if step % 7 == 0:
                self.timed(
                    "save_for_sampler",
                    lambda: tc.save_weights_and_get_sampling_client().result(timeout=HANG_S),
                )

    def sampler(self, i: int) -> None:
        svc = tinker.ServiceClient(base_url=self.base_url, api_key=self.key)
        sc = svc.create_sampling_client(base_model=self.model).result(timeout=HANG_S)
        prompt = types.ModelInput.from_ints([1 + i, 2, 3, 4])
        params = types.SamplingParams(max_tokens=8, temperature=1.0)
        while time.monotonic() < self.deadline:
            self.timed("sample", lambda: sc.sample(prompt, 2, params).result(timeout=HANG_S))

    def openai_stream(self, i: int) -> None:
        client = openai.OpenAI(
            base_url=self.base_url + "/v1", api_key=self.key, timeout=HANG_S, max_retries=0
        )
        while time.monotonic() < self.deadline:

            def one() -> None:
                stream = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": f"count to {i + 3}"}],
                    max_tokens=8,
                    stream=True,
                )
                chunks = sum(1 for _ in stream)
                if chunks == 0:
                    raise RuntimeError("stream ended without a chunk")

            self.timed("openai_stream", one)


def run_soak(
    base_url: str,
    api_key: str,
    model: str,
    server_pid: int,
    duration_s: float,
    trainers: int,
    samplers: int,
    openai_clients: int,
    rss_every_s: float = 1.0,
) -> SoakReport:
    soak = _Soak(base_url, api_key, model, duration_s)
    threads = [
        threading.Thread(target=soak.guard, args=(f"{kind}{i}", lambda f=f, i=i: f(i)))
        for kind, f, n in (
            ("trainer", soak.trainer, trainers),
            ("sampler", soak.sampler, samplers),
            ("openai", soak.openai_stream, openai_clients),
        )
        for i in range(n)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    rss: list[tuple[float, float]] = []
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - t0, _rss_mb(server_pid)))
        time.sleep(rss_every_s)
    for t in threads:
        t.join()
    latency = {op: (statistics.median(v), float(np.percentile(v, 99))) for op, v in soak.lat.items() if v}
    return SoakReport(
        seconds=time.monotonic() - t0,
        ops={op: len(v) for op, v in soak.lat.items()},
        errors=soak.errors,
        hung=soak.hung,
        latency_ms=latency,
        rss_mb=rss,
    )
