"""Dispatch, timing helpers and reporting (a table on stdout, JSON in the output directory)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from treadle.bench.registry import BENCHMARKS


@dataclasses.dataclass
class Row:
    name: str
    treadle: float
    baseline: float
    unit: str
    target: float  # the ratio we aim for (treadle / baseline, higher is better)

    @property
    def ratio(self) -> float:
        return self.treadle / self.baseline if self.baseline else float("inf")


def timed(fn: Callable[[], object], *, repeat: int, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (
        f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, {dev}".strip()
    )


def report(which: str, rows: list[Row], out: str, extra: dict[str, object] | None = None) -> int:
    print(f"\ntreadle bench {which} — {machine()} — torch {torch.__version__}")
    print(f"{'benchmark':44} {'treadle':>12} {'baseline':>12} {'unit':>10} {'ratio':>7} {'target':>7}")
    for r in rows:
        ok = "ok" if r.ratio >= r.target else "BELOW"
        print(
            f"{r.name:44} {r.treadle:12.2f} {r.baseline:12.2f} {r.unit:>10} {r.ratio:6.2f}x {r.target:6.2f}x {ok}"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(out) / f"bench-{which}-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": which,
                "machine": machine(),
                "torch": torch.__version__,
                "date": stamp,
                "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows],
                **(extra or {}),
            },
            indent=2,
        )
    )
    print(f"results: {path}")
    return 0


def run_benchmark(which: str, *, model: str, out: str, quick: bool) -> int:
    import importlib

    module, _, fn = BENCHMARKS[which].partition(":")
    result = getattr(importlib.import_module(module), fn)(model, quick=quick)
    rows, extra = result if isinstance(result, tuple) else (result, None)
    return report(which, rows, out, extra)
