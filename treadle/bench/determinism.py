"""Throughput of deterministic (batch-invariant) vs fast mode, for sampling and for training, in one run.

One engine serves both: the mode is switched around each measurement and the two modes alternate, so
both see the same machine state (a loaded machine skews back-to-back runs by more than the effect).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from treadle import ops
from treadle.bench.runner import Row
from treadle.bench.sample import prompts
from treadle.bench.train import sft_batch
from treadle.engine.engine import Engine
from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig, SampleRequest, SamplingParams

MODES = ("fast", "batch_invariant")


def _alternate(work: Callable[[], None], repeat: int) -> dict[str, float]:
    """Median seconds of `work` in each mode, the modes interleaved; one warm-up call per mode."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(repeat + 1):
        for m in MODES:
            with ops.mode(m):
                t0 = time.perf_counter()
                work()
                if i:
                    times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(ts) for m, ts in times.items()}


def bench_determinism(model: str, *, quick: bool = False) -> list[Row]:
    n, new, batch, seq, repeat = (8, 16, 2, 32, 1) if quick else (16, 32, 4, 64, 3)
    engine = Engine(model)
    try:
        ps = prompts(engine, n)
        params = SamplingParams(max_tokens=new, temperature=1.0, seed=0, stop=())

        def sample_all() -> None:
            for f in [engine.sample(SampleRequest(None, p, params)) for p in ps]:
                f.result()

        engine.create_adapter("bench", LoraConfig(rank=16, seed=0))
        data = sft_batch(batch, seq, engine.info.vocab_size)

        def train_step() -> None:
            engine.forward_backward([ForwardBackwardRequest("bench", data, "cross_entropy")])
            engine.optim_step("bench", AdamParams())

        s = _alternate(sample_all, repeat)
        t = _alternate(train_step, repeat)
        return [
            Row(
                f"sampling {n}x{new}: deterministic vs fast",
                n * new / s["batch_invariant"],
                n * new / s["fast"],
                "tok/s",
                0.75,
            ),
            Row(
                f"training {batch}x{seq}: deterministic vs fast",
                batch * seq / t["batch_invariant"],
                batch * seq / t["fast"],
                "tok/s",
                0.75,
            ),
        ]
    finally:
        engine.close()
