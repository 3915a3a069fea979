"""Deterministic mode at model level (issue #5), in-process: a request's tokens and logprobs are bitwise the same
alone or among random batch-mates (tiny model and the default model), identical seeded requests give one output,
and sampler logprobs of a trained adapter's samples are bitwise `forward` logprobs (KL exactly 0).

The negative control runs the batch test with the mode off and prints whether this machine showed a difference.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest
import torch

from treadle import ops
from treadle.engine.engine import Engine
from treadle.engine.sampler import Sampler
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampledSequence,
    SampleRequest,
    SamplingParams,
)

if TYPE_CHECKING:
    from treadle.models.loader import LoadedModel


@pytest.fixture(scope="module")
def det_engine(tiny_model_dir) -> Iterator[Engine]:
    previous = ops.current().name
    engine = Engine(str(tiny_model_dir), deterministic=True, max_lora_rank=16)
    try:
        yield engine
    finally:
        engine.close()
        # Engine switches the process-wide mode; later test modules expect whatever was there before.
        ops.set_mode(previous)


@pytest.fixture(scope="module")
def default_sampler(embedded_model: LoadedModel) -> Iterator[Sampler]:
    """A sampler over the default model (base weights only); the test selects the ops mode around its calls."""
    sampler = Sampler(
        embedded_model.model,
        lambda _ids: None,
        eos_token_ids=embedded_model.config.eos_token_id,
        max_context_length=embedded_model.max_context_length,
        max_batch_size=16,
    )
    try:
        yield sampler
    finally:
        sampler.close()


def _params(temperature: float, max_tokens: int, seed: int | None) -> SamplingParams:
    # stop=() so every request runs its full length and batch-mates really overlap with it
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=())


def _random_prompt(rng: random.Random, vocab: int, max_len: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(1, max_len))]


def _alone_and_in_crowd(
    sampler: Sampler, target: SampleRequest, *, vocab: int, rng_seed: int, max_prompt: int = 24
) -> tuple[SampledSequence, SampledSequence, float]:
    """The target sampled alone, then again among 15 random requests (it at a random position).

    Returns both sequences and the mean number of rows per decode step during the crowd run, so a caller can
    check the crowd really ran batched."""
    rng = random.Random(rng_seed)
    alone = sampler.generate(target).sequences[0]
    others = [
        SampleRequest(
            None,
            _random_prompt(rng, vocab, max_prompt),
            _params(
                rng.choice([0.0, 1.0]), rng.randint(1, 2 * target.params.max_tokens), rng.randrange(1000)
            ),
        )
        for _ in range(15)
    ]
    crowd = list(others)
    at = rng.randrange(16)
    crowd.insert(at, target)
    steps0, toks0 = sampler.stats.decode_steps, sampler.stats.decode_tokens
    futures = [sampler.submit(r) for r in crowd]
    results = [f.result() for f in futures]
    steps = sampler.stats.decode_steps - steps0
    rows_per_step = (sampler.stats.decode_tokens - toks0) / max(steps, 1)
    return alone, results[at].sequences[0], rows_per_step


def _assert_bitwise_equal(a: SampledSequence, b: SampledSequence) -> None:
    assert a.tokens == b.tokens
    # exact float equality of every logprob, compared as fp32 tensors so a mismatch prints the values
    assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs)), (a.logprobs, b.logprobs)


TEMPERATURES = [pytest.param(0.0, None, id="greedy"), pytest.param(1.0, 1234, id="t1-seeded")]


@pytest.mark.parametrize(("temperature", "seed"), TEMPERATURES)
def test_tiny_alone_equals_in_batch(det_engine: Engine, temperature: float, seed: int | None) -> None:
    vocab = det_engine.info.vocab_size
    rng = random.Random(5)
    # 120 prompt tokens + 16 new: decode crosses the 128-key split boundary; batch-mates have 1..150 tokens
    target = SampleRequest(None, [rng.randrange(vocab) for _ in range(120)], _params(temperature, 16, seed))
    alone, crowded, rows_per_step = _alone_and_in_crowd(
        det_engine.sampler, target, vocab=vocab, rng_seed=11, max_prompt=150
    )
    assert rows_per_step > 2, "the crowd must actually decode in shared batches"
    _assert_bitwise_equal(alone, crowded)


@pytest.mark.parametrize(("temperature", "seed"), TEMPERATURES)
def test_default_model_alone_equals_in_batch(
    default_sampler: Sampler, embedded_model: LoadedModel, temperature: float, seed: int | None
) -> None:
    vocab = embedded_model.config.vocab_size
    text = "Rivers carve valleys, carry sediment to the sea and give towns their water. " * 6
    prompt = [int(t) for t in embedded_model.tokenizer.encode(text)][:60]
    assert len(prompt) == 60  # + 8 new tokens: decode crosses the 64-key split boundary
    target = SampleRequest(None, prompt, _params(temperature, 8, seed))
    with ops.mode("batch_invariant"):
        alone, crowded, rows_per_step = _alone_and_in_crowd(
            default_sampler, target, vocab=vocab, rng_seed=23, max_prompt=16
        )
    assert rows_per_step > 2
    _assert_bitwise_equal(alone, crowded)


def test_identical_seeded_requests_give_one_output(det_engine: Engine) -> None:
    req = SampleRequest(None, [101, 2024, 7, 3301, 42], _params(1.0, 6, 77))
    futures = [det_engine.sample(req) for _ in range(100)]
    outputs = {(tuple(s.tokens), tuple(s.logprobs)) for f in futures for s in f.result().sequences}
    assert len(outputs) == 1


def _datum(tokens: Sequence[int]) -> Datum:
    t = torch.tensor(list(tokens))
    return Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(len(t) - 1)})


def _ok(res: ForwardBackwardResult | Exception) -> ForwardBackwardResult:
    assert not isinstance(res, Exception), res
    return res


def test_sampler_logprobs_equal_forward_after_training(det_engine: Engine) -> None:
    """True on-policy: the trainer's logprobs of the sampled tokens are the sampler's, bit for bit."""
    det_engine.create_adapter("onpolicy", LoraConfig(rank=8, seed=0))
    train = [_datum([5, 17, 400, 9000, 12, 64, 3]), _datum([77, 78, 79, 80, 81])]
    for _ in range(3):
        _ok(det_engine.forward_backward([ForwardBackwardRequest("onpolicy", train, "cross_entropy")])[0])
        det_engine.optim_step("onpolicy", AdamParams(learning_rate=5e-2))

    prompt = [12, 880, 4051, 9, 310, 27]
    res = det_engine.generate(SampleRequest("onpolicy", prompt, _params(1.0, 12, 3), num_samples=3))
    # forward all samples in one trainer batch, next to an unrelated datum, as an RL loop would
    data = [_datum(prompt + s.tokens) for s in res.sequences] + [_datum([9, 8, 7, 6, 5, 4, 3, 2])]
    fwd = _ok(
        det_engine.forward_backward(
            [ForwardBackwardRequest("onpolicy", data, "cross_entropy", forward_only=True)]
        )[0]
    )
    for seq, out in zip(res.sequences, fwd.loss_fn_outputs, strict=False):
        sampler_lp = torch.tensor(seq.logprobs)
        trainer_lp = out["logprobs"][len(prompt) - 1 :].to(sampler_lp.dtype)
        assert torch.equal(sampler_lp, trainer_lp), (sampler_lp, trainer_lp)
        assert float((sampler_lp - trainer_lp).mean()) == 0.0  # the sampler–trainer KL estimate


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_negative_control_fast_mode_reports(
    which: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the mode off, the same batch test; whether outputs differ depends on the hardware: printed only."""
    if which == "tiny":
        sampler: Sampler = request.getfixturevalue("det_engine").sampler
    else:
        sampler = request.getfixturevalue("default_sampler")
    vocab = sampler.vocab_size
    target = SampleRequest(None, _random_prompt(random.Random(8), vocab, 20), _params(1.0, 8, 99))
    with ops.mode("fast"):
        alone, crowded, _ = _alone_and_in_crowd(sampler, target, vocab=vocab, rng_seed=31, max_prompt=16)
    tokens_differ = alone.tokens != crowded.tokens
    bits_differ = tokens_differ or alone.logprobs != crowded.logprobs
    max_diff = (
        max(abs(a - b) for a, b in zip(alone.logprobs, crowded.logprobs, strict=True))
        if not tokens_differ
        else None
    )
    with capsys.disabled():
        print(
            f"\n[negative control, fast mode, {which} model] alone vs in a batch of 16: "
            f"tokens differ={tokens_differ}, logprob bits differ={bits_differ}, max |Δlogprob|={max_diff}"
        )
