"""Sampling throughput: 32 prompts x 64 new tokens through treadle's sampler vs `transformers` `generate`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from treadle.bench.runner import Row
from treadle.engine.engine import Engine
from treadle.engine.types import SampleRequest, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What does a bee make?",
    "Explain gravity in one sentence.",
]


def prompts(engine: Engine, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}]
        ids = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append([int(t) for t in (ids if isinstance(ids, list) else ids["input_ids"])])
    return out


def bench_sample(model: str, *, quick: bool = False) -> list[Row]:
    n, new = (8, 16) if quick else (32, 64)
    engine = Engine(model)
    try:
        ps = prompts(engine, n)
        # stop=[] so every request produces exactly `new` tokens on both sides
        params = SamplingParams(max_tokens=new, temperature=0.0, stop=())

        def run_treadle() -> None:
            futs = [engine.sample(SampleRequest(None, p, params)) for p in ps]
            for f in futs:
                assert len(f.result().sequences[0].tokens) == new

        run_treadle()  # warm-up
        t0 = time.perf_counter()
        run_treadle()
        t_treadle = time.perf_counter() - t0

        # the baseline loads (first call) and runs on the engine's compute thread too, so both sides compute
        # with the same (one) OpenMP team: see treadle.engine.compute
        run_hf = generate_fn(engine, ps, new)
        engine.compute.call(run_hf)
        t0 = time.perf_counter()
        engine.compute.call(run_hf)
        t_hf = time.perf_counter() - t0
        tokens = n * new
        return [
            Row(f"sample {n} prompts x {new} new tokens", tokens / t_treadle, tokens / t_hf, "tok/s", 1.5)
        ]
    finally:
        engine.close()


def generate_fn(engine: Engine, ps: list[list[int]], new: int) -> Callable[[], None]:
    """`transformers` batched greedy `generate` of exactly `new` tokens for `ps` (left-padded); the model loads on
    the first call, so call it on the engine's compute thread."""
    from transformers import AutoModelForCausalLM

    state: dict[str, Any] = {}
    width = max(len(p) for p in ps)
    pad = engine.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])

    def run() -> None:
        if "hf" not in state:
            state["hf"] = AutoModelForCausalLM.from_pretrained(
                engine.info.tokenizer_dir, dtype=torch.float32
            ).eval()
        with torch.no_grad():
            out = state["hf"].generate(  # type: ignore[attr-defined]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        assert out.shape[1] == width + new

    return run
