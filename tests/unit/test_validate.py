"""`treadle.engine.validate`: the one set of checks a forward_backward datum and a sample request pass, at the
service's edge and in the engine's guard. Every bad field is a UserError whose field and message name it and
say what is allowed; good requests pass untouched."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from treadle.engine import validate
from treadle.engine.types import Datum, ForwardBackwardRequest, SampleRequest, SamplingParams
from treadle.errors import UserError

VOCAB, CTX = 128, 64


def _datum(n: int = 4, /, **inputs: torch.Tensor) -> Datum:
    toks = torch.arange(1, n + 1)
    return Datum(toks, {"target_tokens": toks + 1, **inputs})


def _fb(*data: Datum, loss_fn: str = "cross_entropy", **kw: Any) -> ForwardBackwardRequest:
    return ForwardBackwardRequest("a", list(data), loss_fn, **kw)


def test_good_data_pass() -> None:
    validate.forward_backward_data(_fb(_datum(), _datum(CTX, weights=torch.ones(CTX))), VOCAB, CTX)
    rl = {"logprobs": torch.zeros(4), "advantages": torch.ones(4)}
    validate.forward_backward_data(_fb(_datum(**rl), loss_fn="ppo"), VOCAB, CTX)
    base = ForwardBackwardRequest(None, [_datum()], "cross_entropy", forward_only=True)
    validate.forward_backward_data(base, VOCAB, CTX)  # forward on the base model needs no adapter


@pytest.mark.parametrize(
    ("req", "field", "says"),
    [
        (_fb(), "data", "at least one datum"),
        (_fb(_datum(), Datum(torch.tensor([], dtype=torch.long), {})), "data[1].model_input", "at least one"),
        (
            _fb(_datum(CTX + 1)),
            "data[0].model_input",
            f"65 tokens exceed the model's max_context_length {CTX}",
        ),
        (
            _fb(Datum(torch.tensor([1, VOCAB]), {})),
            "data[0].model_input",
            f"must be in 0..{VOCAB - 1}, got 128",
        ),
        (_fb(Datum(torch.tensor([-3, 1]), {})), "data[0].model_input", "got -3"),
        (_fb(Datum(torch.tensor([1, 2]), {})), "data[0].loss_fn_inputs.target_tokens", "is required"),
        (
            _fb(Datum(torch.tensor([1, 2, 3]), {"target_tokens": torch.tensor([1, 2])})),
            "data[0].loss_fn_inputs.target_tokens",
            "",
        ),
        (_fb(_datum(weights=torch.ones(3))), "data[0].loss_fn_inputs.weights", "shape"),
        (_fb(_datum(bogus=torch.ones(4))), "data[0].loss_fn_inputs.bogus", "allowed: target_tokens, weights"),
        (
            _fb(
                _datum(logprobs=torch.zeros(4), advantages=torch.tensor([1.0, math.nan, 0, 0])), loss_fn="ppo"
            ),
            "data[0].loss_fn_inputs.advantages",
            "",
        ),
        (_fb(_datum(), loss_fn="no_such_loss"), "loss_fn", "no_such_loss"),
        (_fb(_datum(), loss_fn_config={"nope": 1.0}), "loss_fn_config", "nope"),
        (ForwardBackwardRequest(None, [_datum()], "cross_entropy"), "model_id", "needs a LoRA adapter"),
    ],
)
def test_each_bad_datum_field_is_named(req: ForwardBackwardRequest, field: str, says: str) -> None:
    with pytest.raises(UserError) as e:
        validate.forward_backward_data(req, VOCAB, CTX)
    assert e.value.field is not None and e.value.field.startswith(field), (e.value.field, e.value.message)
    assert e.value.message.startswith(field) and says in e.value.message, e.value.message


def _sample(prompt: list[int] | None = None, **kw: Any) -> SampleRequest:
    params = kw.pop("params", SamplingParams(max_tokens=4))
    return SampleRequest(None, [1, 2, 3] if prompt is None else prompt, params, **kw)


def test_good_samples_pass() -> None:
    validate.sample_request(
        _sample(num_samples=8, topk_prompt_logprobs=100), vocab_size=VOCAB, max_context_length=CTX
    )
    validate.sample_request(
        _sample([1] * 60, params=SamplingParams(max_tokens=4, stop=("x",), seed=3)),
        vocab_size=VOCAB,
        max_context_length=CTX,
        max_num_samples=1,
    )


@pytest.mark.parametrize(
    ("req", "field", "says"),
    [
        (_sample([]), "prompt", "at least one token"),
        (_sample([1, VOCAB]), "prompt", f"0..{VOCAB - 1}, got 128"),
        (_sample([-1]), "prompt", "got -1"),
        (_sample(num_samples=0), "num_samples", "in 1..16, got 0"),
        (_sample(num_samples=17), "num_samples", "in 1..16, got 17"),
        (_sample(topk_prompt_logprobs=101), "topk_prompt_logprobs", "in 0..100, got 101"),
        (_sample(topk_sample_logprobs=-1), "topk_sample_logprobs", ""),
        (_sample(prompt_logprobs_last_n=1), "prompt_logprobs_last_n", "requires prompt_logprobs"),
        (_sample(params=SamplingParams(max_tokens=0)), "sampling_params.max_tokens", "≥ 1"),
        (_sample(params=SamplingParams(temperature=-1.0)), "sampling_params.temperature", "≥ 0"),
        (_sample(params=SamplingParams(top_p=0.0)), "sampling_params.top_p", "(0, 1]"),
        (_sample(params=SamplingParams(stop=(VOCAB,))), "sampling_params.stop", ""),
        (
            _sample([1] * 61, params=SamplingParams(max_tokens=4)),
            "sampling_params.max_tokens",
            f"= 65 exceeds the model's max_context_length {CTX}",
        ),
    ],
)
def test_each_bad_sample_field_is_named(req: SampleRequest, field: str, says: str) -> None:
    with pytest.raises(UserError) as e:
        validate.sample_request(req, vocab_size=VOCAB, max_context_length=CTX, max_num_samples=16)
    assert e.value.field == field, (e.value.field, e.value.message)
    assert e.value.message.startswith(field) and says in e.value.message, e.value.message


def test_string_stops_need_a_tokenizer_and_the_cap_is_the_servers() -> None:
    req = _sample(params=SamplingParams(stop=("END",)))
    with pytest.raises(UserError, match="sampling_params.stop: string stops need a tokenizer"):
        validate.sample_request(req, vocab_size=VOCAB, max_context_length=CTX, can_decode=False)
    many = _sample(num_samples=1000)
    validate.sample_request(many, vocab_size=VOCAB, max_context_length=CTX)  # the engine sets no cap
    with pytest.raises(UserError, match=r"num_samples: must be an integer in 1\.\.128, got 1000"):
        validate.sample_request(many, vocab_size=VOCAB, max_context_length=CTX, max_num_samples=128)
