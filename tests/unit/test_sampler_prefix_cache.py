"""The sampler's retained prefix cache (issue 10) on the tiny model: a multi-turn conversation (each prompt is the
previous prompt + its sampled tokens + an env reply) gives the same tokens and logprobs with retention as without
(≤ 1e-5 in fast mode, bitwise in deterministic mode) while the second turn prefills only what is new; KV written
under other weights (a trained adapter, a re-made snapshot, another adapter) never hits; retained slots are
evicted least recently used first and never grow the cache past its budget.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from treadle import ops
from treadle.engine.engine import Engine
from treadle.engine.sampler import Sampler
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SampleResult,
    SamplingParams,
)


@contextlib.contextmanager
def engine(model_dir: Path, *, deterministic: bool = False, retention: bool = True) -> Iterator[Engine]:
    previous = ops.current().name
    e = Engine(str(model_dir), deterministic=deterministic, max_lora_rank=8, prefix_retention=retention)
    try:
        yield e
    finally:
        e.close()
        ops.set_mode(previous)  # Engine switches the process-wide mode; restore it for later modules


def reply(turn: int, n: int = 20) -> list[int]:
    """The env's answer after a turn (~20 tokens, different every turn)."""
    rng = random.Random(1000 + turn)
    return [rng.randrange(100, 3000) for _ in range(n)]


def conversation(
    e: Engine, adapter: str | None, prompt: list[int], turns: int, temperature: float
) -> list[tuple[list[int], SampleResult]]:
    """`turns` turns: each prompt = the previous prompt + its sampled tokens + an env reply."""
    out = []
    for t in range(turns):
        params = SamplingParams(max_tokens=8, temperature=temperature, seed=7 + t, stop=())
        res = e.generate(SampleRequest(adapter, list(prompt), params))
        out.append((list(prompt), res))
        prompt = prompt + res.sequences[0].tokens + reply(t)
    return out


PROMPT = [random.Random(0).randrange(100, 3000) for _ in range(40)]


@pytest.mark.parametrize(
    "deterministic", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fast", "deterministic"]
)
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_turns_equal_without_retention(tiny_model_dir: Path, deterministic: bool, temperature: float) -> None:
    with engine(tiny_model_dir, deterministic=deterministic, retention=False) as off:
        ref = conversation(off, None, PROMPT, 3, temperature)
        assert [r.prompt_cache_hit_tokens for _, r in ref] == [0, 0, 0]
    with engine(tiny_model_dir, deterministic=deterministic) as on:
        got = conversation(on, None, PROMPT, 3, temperature)
        stats = on.sampler.stats
    for t, ((p_ref, r_ref), (p, r)) in enumerate(zip(ref, got, strict=True)):
        a, b = r_ref.sequences[0], r.sequences[0]
        assert p == p_ref and b.tokens == a.tokens, t
        if deterministic:
            assert torch.equal(torch.tensor(b.logprobs), torch.tensor(a.logprobs)), t
        else:
            assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0), t
    # turn t + 1 reuses turn t's prompt and all its sampled tokens but the last (never run through the model)
    hits = [r.prompt_cache_hit_tokens for _, r in got]
    assert hits == [0] + [len(ref[t][0]) + 8 - 1 for t in range(2)]
    assert stats.retained_hit_tokens == sum(hits)
    assert stats.prefill_tokens == len(PROMPT) + 2 * (1 + len(reply(0)))


def _train_step(e: Engine, adapter: str) -> None:
    t = torch.tensor(PROMPT[:12])
    datum = Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(11)})
    out = e.forward_backward([ForwardBackwardRequest(adapter, [datum], "cross_entropy")])[0]
    assert not isinstance(out, Exception), out
    e.optim_step(adapter, AdamParams(learning_rate=1e-2))


def _extend(e: Engine, adapter: str | None, prompt: list[int], res: SampleResult, turn: int) -> SampleResult:
    nxt = prompt + res.sequences[0].tokens + reply(turn)
    return e.generate(SampleRequest(adapter, nxt, SamplingParams(max_tokens=4, temperature=0.0, stop=())))


def test_no_hit_after_the_weights_change(tiny_model_dir: Path) -> None:
    with engine(tiny_model_dir) as e:
        e.create_adapter("a", LoraConfig(rank=4, seed=0))
        e.create_adapter("b", LoraConfig(rank=4, seed=1))
        _train_step(e, "a")  # nonzero LoRA deltas
        [(p, first)] = conversation(e, "a", PROMPT, 1, 0.0)
        assert _extend(e, "a", p, first, 0).prompt_cache_hit_tokens == len(p) + 8 - 1  # positive control
        assert _extend(e, "b", p, first, 0).prompt_cache_hit_tokens == 0  # another adapter
        assert _extend(e, None, p, first, 0).prompt_cache_hit_tokens == 0  # the base model
        _train_step(e, "a")  # the same adapter id, updated in place
        assert _extend(e, "a", p, first, 0).prompt_cache_hit_tokens == 0

        # a sampler snapshot removed and re-made under the same id holds other weights
        e.snapshot_adapter("a", "snap")
        [(p, first)] = conversation(e, "snap", PROMPT, 1, 0.0)
        e.remove_adapter("snap")
        _train_step(e, "a")
        e.snapshot_adapter("a", "snap")
        again = _extend(e, "snap", p, first, 0)
        assert again.prompt_cache_hit_tokens == 0
        with engine(tiny_model_dir, retention=False) as off:  # and samples what those weights give
            off.create_adapter("a", LoraConfig(rank=4, seed=0))
            for _ in range(3):
                _train_step(off, "a")
            ref = _extend(off, "a", p, first, 0)
        assert again.sequences[0].tokens == ref.sequences[0].tokens


def _greedy(prompt: list[int], n: int = 4) -> SampleRequest:
    return SampleRequest(None, prompt, SamplingParams(max_tokens=n, temperature=0.0, stop=()))


def test_retained_slots_evicted_lru_within_the_budget(tiny_model_dir: Path) -> None:
    """8 concurrent conversations fill the 8 allocated slots; 8 more evict those (least recent first) instead of
    growing the cache to 16 slots, and only the recent ones still hit."""
    with engine(tiny_model_dir) as e:
        cache = e.sampler._cache  # noqa: SLF001 - the allocation is what this test bounds
        s = Sampler(
            e.model,
            e.bank.hook,
            eos_token_ids=[],
            max_context_length=e.info.max_context_length,
            max_batch_size=16,
            max_kv_cache_bytes=cache.nbytes,  # exactly the initial 8 slots × 256 positions
            compute=e.compute,
            weights_key=lambda _aid: (e.model, 0),
        )
        try:
            rng = random.Random(3)
            prompts = [[rng.randrange(100, 3000) for _ in range(30)] for _ in range(16)]
            first = [f.result() for f in [s.submit(_greedy(p)) for p in prompts[:8]]]
            second = [f.result() for f in [s.submit(_greedy(p)) for p in prompts[8:]]]
            assert s._cache.num_slots == 8  # noqa: SLF001
            assert s._cache.nbytes <= cache.nbytes  # noqa: SLF001
            old = s.generate(_greedy(prompts[0] + first[0].sequences[0].tokens + reply(0)))
            recent = s.generate(_greedy(prompts[15] + second[7].sequences[0].tokens + reply(0)))
        finally:
            s.close()
    assert old.prompt_cache_hit_tokens == 0  # evicted
    assert recent.prompt_cache_hit_tokens == 30 + 4 - 1


def test_serve_flag_turns_retention_off() -> None:
    from treadle.cli import build_parser
    from treadle.server import ServerConfig

    parser = build_parser()
    assert ServerConfig.from_cli(parser.parse_args(["serve"])).prefix_retention
    assert not ServerConfig.from_cli(parser.parse_args(["serve", "--no-prefix-retention"])).prefix_retention


def test_large_idle_cache_kept_for_the_next_turn_released_for_training(tiny_model_dir: Path) -> None:
    """An idle cache past the idle size stays while it holds retained prefixes (within the KV budget), and goes
    back to the allocator, prefixes and all, when a training op needs the memory."""
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 3000) for _ in range(1100)] for _ in range(9)]  # 16 slots x 2048 positions
    with engine(tiny_model_dir) as e:
        e.create_adapter("a", LoraConfig(rank=4, seed=0))
        first = [f.result() for f in [e.sample(_greedy(p)) for p in prompts]]
        cache = e.sampler._cache  # noqa: SLF001 - the allocation is what this test checks
        assert (cache.num_slots, cache.capacity) == (16, 2048)
        nxt = prompts[0] + first[0].sequences[0].tokens + reply(0)
        assert e.generate(_greedy(nxt)).prompt_cache_hit_tokens == 1100 + 4 - 1
        _train_step(e, "a")  # another adapter trains while nothing samples
        cache = e.sampler._cache  # noqa: SLF001
        assert (cache.num_slots, cache.capacity) == (8, 256)
        assert e.generate(_greedy(prompts[1] + first[1].sequences[0].tokens)).prompt_cache_hit_tokens == 0
