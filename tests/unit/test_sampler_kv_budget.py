"""The sampler's KV budget: under a steady mix of short and long requests the cache never grows past
`max_kv_cache_bytes` (beyond what one row alone needs), requests that do not fit wait instead of failing, and
every result is the one an unbounded sampler gives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.small_models import load_small, write_small_checkpoint
from treadle.engine.sampler import Sampler
from treadle.engine.types import SampleRequest, SamplingParams
from treadle.models import CausalLM

MAX_CTX = 128


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    d = write_small_checkpoint(
        tmp_path_factory.mktemp("ckpt"), max_position_embeddings=MAX_CTX, initializer_range=0.2
    )
    return load_small(d)


@contextlib.contextmanager
def _sampler(model: CausalLM, budget: int | None) -> Iterator[Sampler]:
    s = Sampler(
        model,
        lambda ids: None,
        eos_token_ids=[],
        max_context_length=MAX_CTX,
        max_batch_size=16,
        max_kv_cache_bytes=budget,
    )
    yield s
    s.close()


def _requests() -> list[SampleRequest]:
    out = []
    for i in range(8):
        n = 90 if i % 4 == 1 else 3 + i  # a few long prompts among short ones
        prompt = [(7 * i + j) % 100 + 3 for j in range(n)]
        out.append(
            SampleRequest(None, prompt, SamplingParams(max_tokens=4 + i, temperature=0.0), num_samples=2)
        )
    return out


def test_cache_stays_within_budget_and_results_are_unchanged(model: CausalLM) -> None:
    with _sampler(model, None) as s:
        reference = [f.result() for f in [s.submit(r) for r in _requests()]]
        per_token = s._cache.nbytes_after(1, 1) // (s._cache.num_slots * s._cache.capacity)
    budget = 4 * 32 * per_token  # room for 4 short rows; a long row alone needs more than that
    peaks: list[int] = []
    with _sampler(model, budget) as s:
        cache = s._cache
        ensure = cache.ensure

        def recording_ensure(slots: int, length: int) -> None:
            ensure(slots, length)
            peaks.append(cache.nbytes)

        cache.ensure = recording_ensure  # type: ignore[method-assign]
        results = [f.result(timeout=300) for f in [s.submit(r) for r in _requests()]]

    longest_alone = max(len(r.prompt) + r.params.max_tokens for r in _requests())
    one_row = 8 * 128 * per_token  # the initial 8 slots, grown to the longest row's length (doubled)
    assert longest_alone <= 128
    assert max(peaks) <= max(budget, one_row), (max(peaks), budget, one_row)
    for got, ref in zip(results, reference, strict=True):
        assert [q.tokens for q in got.sequences] == [q.tokens for q in ref.sequences]
