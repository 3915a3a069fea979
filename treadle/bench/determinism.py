"""Throughput of deterministic (batch-invariant) vs fast mode, for sampling and for training, in one run."""

from __future__ import annotations

import time

from treadle.bench.runner import Row, timed
from treadle.bench.sample import prompts
from treadle.bench.train import sft_batch
from treadle.engine.engine import Engine
from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig, SampleRequest, SamplingParams


def _measure(model: str, deterministic: bool, quick: bool) -> tuple[float, float]:
    n, new, batch, seq = (8, 16, 2, 32) if quick else (16, 32, 4, 64)
    engine = Engine(model, deterministic=deterministic)
    try:
        ps = prompts(engine, n)
        params = SamplingParams(max_tokens=new, temperature=1.0, seed=0, stop=())

        def sample_all() -> None:
            for f in [engine.sample(SampleRequest(None, p, params)) for p in ps]:
                f.result()

        sample_all()
        t0 = time.perf_counter()
        sample_all()
        sample_tps = n * new / (time.perf_counter() - t0)

        engine.create_adapter("bench", LoraConfig(rank=16, seed=0))
        data = sft_batch(batch, seq, engine.info.vocab_size)

        def step() -> None:
            engine.forward_backward([ForwardBackwardRequest("bench", data, "cross_entropy")])
            engine.optim_step("bench", AdamParams())

        train_tps = batch * seq / timed(step, repeat=2)
        return sample_tps, train_tps
    finally:
        engine.close()


def bench_determinism(model: str, *, quick: bool = False) -> list[Row]:
    fast_s, fast_t = _measure(model, False, quick)
    det_s, det_t = _measure(model, True, quick)
    return [
        Row("sampling: deterministic vs fast", det_s, fast_s, "tok/s", 0.75),
        Row("training: deterministic vs fast", det_t, fast_t, "tok/s", 0.75),
    ]
