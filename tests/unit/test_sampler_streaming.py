"""Sampler streaming on a tiny random-init llama: the per-token callback reports exactly the returned tokens
(stop token included) before the future resolves, cancelling drops a request's rows before the next step
without disturbing its batch-mates, and a raising callback fails only its own request."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.small_models import load_small, write_small_checkpoint
from treadle.engine.sampler import Sampler
from treadle.engine.types import SampleRequest, SamplingParams
from treadle.models import CausalLM

EOS = 2
MAX_CTX = 96
PROMPT = [5, 9, 3, 17]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    d = write_small_checkpoint(
        tmp_path_factory.mktemp("ckpt"),
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    return load_small(d)


@pytest.fixture
def sampler(model: CausalLM) -> Iterator[Sampler]:
    s = Sampler(model, lambda ids: None, eos_token_ids=[EOS], max_context_length=MAX_CTX, max_batch_size=8)
    yield s
    s.close()


def req(prompt: list[int], n: int = 1, **params: Any) -> SampleRequest:
    return SampleRequest(None, prompt, SamplingParams(**params), num_samples=n)


class Recorder:
    """Collects callback calls per sample index; `at_done` is how many had arrived when the future resolved."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.at_done = -1

    def __call__(self, index: int, token: int, logprob: float) -> None:
        self.tokens.setdefault(index, []).append(token)
        self.logprobs.setdefault(index, []).append(logprob)

    def count(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    def watch(self, fut: concurrent.futures.Future[Any]) -> None:
        fut.add_done_callback(lambda f: setattr(self, "at_done", self.count()))


def test_callback_reports_every_returned_token_before_the_future_resolves(sampler: Sampler) -> None:
    rec = Recorder()
    fut = sampler.submit(req(PROMPT, n=3, max_tokens=12, temperature=1.0, seed=3), rec)
    rec.watch(fut)
    res = fut.result(timeout=60)
    assert sorted(rec.tokens) == [0, 1, 2]
    for i, seq in enumerate(res.sequences):
        assert rec.tokens[i] == seq.tokens
        assert rec.logprobs[i] == seq.logprobs
    assert rec.at_done == sum(len(s.tokens) for s in res.sequences)


def test_final_stop_token_is_reported(sampler: Sampler) -> None:
    greedy = sampler.generate(req(PROMPT, max_tokens=10, temperature=0.0)).sequences[0].tokens
    stop = greedy[3]
    rec = Recorder()
    seq = sampler.submit(req(PROMPT, max_tokens=10, temperature=0.0, stop=[stop]), rec).result(60)
    assert seq.sequences[0].stop_reason == "stop"
    assert rec.tokens[0] == seq.sequences[0].tokens == greedy[: greedy.index(stop) + 1]


def test_cancel_drops_the_rows_before_the_next_step_and_spares_batch_mates(sampler: Sampler) -> None:
    alone = sampler.generate(req([7, 8, 9], max_tokens=40, temperature=0.0)).sequences[0].tokens
    holder: list[concurrent.futures.Future[Any]] = []
    submitted = threading.Event()
    seen: list[int] = []

    def cancel_on_third(index: int, token: int, logprob: float) -> None:
        seen.append(token)
        if len(seen) == 3:
            assert submitted.wait(30)
            assert sampler.cancel(holder[0])

    mate = sampler.submit(req([7, 8, 9], max_tokens=40, temperature=0.0))
    holder.append(sampler.submit(req(PROMPT, n=2, max_tokens=80, temperature=0.0), cancel_on_third))
    submitted.set()
    with pytest.raises(concurrent.futures.CancelledError):
        holder[0].result(timeout=60)
    assert mate.result(timeout=60).sequences[0].tokens == alone
    # Cancelled during the step that drew the 3rd token: both rows of that step report, then nothing more.
    assert len(seen) <= 4
    assert sampler.active_rows == 0


def test_cancel_from_another_thread_stops_generation(sampler: Sampler) -> None:
    started = threading.Event()
    rec = Recorder()

    def on_token(index: int, token: int, logprob: float) -> None:
        rec(index, token, logprob)
        started.set()

    fut = sampler.submit(req(PROMPT, max_tokens=90, temperature=0.0, stop=[]), on_token)
    assert started.wait(60)
    cancelled = sampler.cancel(fut)
    if cancelled:  # it could only have finished first if the whole reply beat this thread
        assert fut.cancelled()
        after = sampler.generate(req(PROMPT, max_tokens=2, temperature=0.0))  # the loop goes on
        assert len(after.sequences[0].tokens) == 2
        assert rec.count() < 90
        assert sampler.active_rows == 0
    else:
        assert len(fut.result().sequences[0].tokens) == 90


def test_cancel_after_completion_keeps_the_result(sampler: Sampler) -> None:
    fut = sampler.submit(req(PROMPT, max_tokens=3, temperature=0.0))
    res = fut.result(timeout=60)
    assert not sampler.cancel(fut)
    assert fut.result() is res


def test_raising_callback_fails_only_its_request(sampler: Sampler) -> None:
    def boom(index: int, token: int, logprob: float) -> None:
        if index == 1:
            raise ValueError("client went away")

    mate = sampler.submit(req([7, 8, 9], max_tokens=20, temperature=0.0))
    bad = sampler.submit(req(PROMPT, n=2, max_tokens=20, temperature=0.0), boom)
    with pytest.raises(ValueError, match="client went away"):
        bad.result(timeout=60)
    assert len(mate.result(timeout=60).sequences[0].tokens) == 20
    again = sampler.generate(req(PROMPT, max_tokens=4, temperature=0.0))
    assert len(again.sequences[0].tokens) == 4
    assert sampler.active_rows == 0
