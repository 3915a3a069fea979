"""The engine facade on a tiny model: mixed-adapter training, bad input (each a typed error naming the
field, with the engine and other adapters unaffected), and sampler/forward logprob agreement."""

from __future__ import annotations

import math

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)
from treadle.errors import NotFoundError, UserError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine(str(tiny_model_dir), max_lora_rank=64)
    yield e
    e.close()


def _datum(tokens: list[int], **extra: torch.Tensor) -> Datum:
    t = torch.tensor(tokens)
    inputs = {"target_tokens": torch.roll(t, -1), "weights": torch.ones(len(tokens))}
    inputs.update(extra)
    return Datum(t, inputs)


def _snapshot(engine: Engine, adapter_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.bank.trainable_parameters(adapter_id)]


def test_fused_batch_equals_separate_calls(engine):
    for a in ("fa", "fb"):
        engine.create_adapter(a, LoraConfig(rank=4, seed=1))
    d1, d2 = [_datum([1, 2, 3, 4, 5])], [_datum([7, 8, 9])]
    fused = engine.forward_backward(
        [
            ForwardBackwardRequest("fa", d1, "cross_entropy", forward_only=True),
            ForwardBackwardRequest("fb", d2, "cross_entropy", forward_only=True),
        ]
    )
    alone = engine.forward_backward([ForwardBackwardRequest("fb", d2, "cross_entropy", forward_only=True)])
    assert not isinstance(fused[1], Exception) and not isinstance(alone[0], Exception)
    torch.testing.assert_close(
        fused[1].loss_fn_outputs[0]["logprobs"], alone[0].loss_fn_outputs[0]["logprobs"]
    )
    assert set(fused[0].metrics) >= {"loss:sum"}
    assert all(k.count(":") == 1 for k in fused[0].metrics)


def test_training_lowers_loss_and_isolates_adapters(engine):
    engine.create_adapter("train", LoraConfig(rank=8, seed=0))
    engine.create_adapter("other", LoraConfig(rank=8, seed=3))
    before_other = _snapshot(engine, "other")
    data = [_datum([11, 12, 13, 14, 15, 16])]
    losses = []
    for _ in range(5):
        (res,) = engine.forward_backward([ForwardBackwardRequest("train", data, "cross_entropy")])
        assert not isinstance(res, Exception)
        losses.append(res.metrics["loss:sum"])
        engine.optim_step("train", AdamParams(learning_rate=1e-2))
    assert losses[-1] < losses[0]
    for a, b in zip(before_other, _snapshot(engine, "other"), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        (
            {
                "data": [
                    Datum(
                        torch.tensor([1, 10**7]),
                        {"target_tokens": torch.tensor([1, 2]), "weights": torch.ones(2)},
                    )
                ]
            },
            "model_input",
        ),
        (
            {
                "data": [
                    Datum(
                        torch.tensor([], dtype=torch.long),
                        {"target_tokens": torch.tensor([], dtype=torch.long)},
                    )
                ]
            },
            "model_input",
        ),
        (
            {
                "data": [
                    Datum(
                        torch.tensor([1, 2, 3]),
                        {"target_tokens": torch.tensor([1, 2]), "weights": torch.ones(2)},
                    )
                ]
            },
            "target_tokens",
        ),
        ({"loss_fn": "no_such_loss"}, "loss_fn"),
        ({"loss_fn_config": {"no_such_key": 1.0}}, "loss_fn_config"),
    ],
)
def test_bad_training_input_is_rejected_and_costs_nothing(engine, request_kwargs, field):
    engine.create_adapter(f"bad-{field}-{len(engine.bank.ids())}", LoraConfig(rank=4, seed=0))
    adapter = engine.bank.ids()[-1]
    before = _snapshot(engine, adapter)
    kwargs = {"adapter_id": adapter, "data": [_datum([1, 2, 3])], "loss_fn": "cross_entropy"} | request_kwargs
    (res,) = engine.forward_backward([ForwardBackwardRequest(**kwargs)])
    assert isinstance(res, UserError)
    assert field in res.message
    assert not engine.bank.has_grad(adapter)
    engine.optim_step(adapter, AdamParams())
    for a, b in zip(before, _snapshot(engine, adapter), strict=True):
        assert torch.equal(a, b)


def test_non_finite_advantages_rejected(engine):
    engine.create_adapter("rl", LoraConfig(rank=4, seed=0))
    t = torch.tensor([1, 2, 3])
    d = Datum(
        t, {"target_tokens": t, "logprobs": torch.zeros(3), "advantages": torch.tensor([1.0, math.nan, 0.0])}
    )
    (res,) = engine.forward_backward([ForwardBackwardRequest("rl", [d], "importance_sampling")])
    assert isinstance(res, UserError) and "advantages" in res.message


def test_a_bad_request_fails_alone_in_a_fused_batch(engine):
    engine.create_adapter("good", LoraConfig(rank=4, seed=0))
    good = ForwardBackwardRequest("good", [_datum([1, 2, 3])], "cross_entropy")
    bad = ForwardBackwardRequest("missing-adapter", [_datum([1, 2, 3])], "cross_entropy")
    res = engine.forward_backward([good, bad])
    assert not isinstance(res[0], Exception)
    assert isinstance(res[1], NotFoundError) and "model_id" in res[1].message


@pytest.mark.parametrize("rank", [0, -1, 65])
def test_bad_rank(engine, rank):
    with pytest.raises(UserError, match="rank"):
        engine.create_adapter(f"rank{rank}", LoraConfig(rank=rank))
    assert f"rank{rank}" not in engine.bank


def test_unknown_model_names_searched_path(tmp_path):
    with pytest.raises(NotFoundError) as e:
        Engine(str(tmp_path / "no-such-model"))
    assert "no-such-model" in e.value.message


def test_bad_sampling_input(engine):
    with pytest.raises(UserError, match="prompt"):
        engine.sample(SampleRequest(None, [], SamplingParams(max_tokens=2)))
    with pytest.raises(UserError, match="prompt"):
        engine.sample(SampleRequest(None, [10**7], SamplingParams(max_tokens=2)))
    with pytest.raises(UserError, match="temperature"):
        engine.sample(SampleRequest(None, [1, 2], SamplingParams(max_tokens=2, temperature=-1.0)))
    with pytest.raises(NotFoundError):
        engine.sample(SampleRequest("nope", [1, 2], SamplingParams(max_tokens=2)))
    # and the engine still serves
    out = engine.generate(SampleRequest(None, [1, 2], SamplingParams(max_tokens=3, temperature=0.0, stop=())))
    assert len(out.sequences[0].tokens) == 3


def test_sampler_logprobs_equal_forward_logprobs_with_adapter(engine):
    engine.create_adapter("lp", LoraConfig(rank=4, seed=0))
    data = [_datum([21, 22, 23, 24])]
    engine.forward_backward([ForwardBackwardRequest("lp", data, "cross_entropy")])
    engine.optim_step("lp", AdamParams(learning_rate=5e-2))  # make the adapter non-trivial
    prompt = [5, 6, 7, 8]
    res = engine.generate(
        SampleRequest("lp", prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=()))
    )
    seq = res.sequences[0]
    full = torch.tensor(prompt + seq.tokens)
    d = Datum(full[:-1], {"target_tokens": full[1:], "weights": torch.ones(len(full) - 1)})
    (fwd,) = engine.forward_backward([ForwardBackwardRequest("lp", [d], "cross_entropy", forward_only=True)])
    assert not isinstance(fwd, Exception)
    fwd_lp = fwd.loss_fn_outputs[0]["logprobs"][len(prompt) - 1 :]
    torch.testing.assert_close(torch.tensor(seq.logprobs), fwd_lp, atol=1e-4, rtol=0)
