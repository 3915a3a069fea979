"""Wire codec against the SDK's own converters: what the SDK encodes decodes to the right tensors (dense and
sparse CSR 2-D), and what treadle encodes the SDK decodes back exactly (ragged outputs, NaN, top-k)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from treadle.api.tinker.codec import decode_forward_backward, encode_forward_backward, encode_sample
from treadle.engine.types import (
    ForwardBackwardResult,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)
from treadle.errors import UserError


def test_sdk_request_decodes() -> None:
    targets_2d = torch.tensor([[5, 0], [6, 7], [0, 0]])
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch_sparse(targets_2d),
            "weights": types.TensorData.from_numpy(
                np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]], np.float32)
            ),
        },
    )
    req = types.ForwardBackwardRequest(
        model_id="s:train:0",
        seq_id=3,
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}
        ),
    )
    mid, seq, out = decode_forward_backward(forward_backward_request_to_proto(req).SerializeToString())
    assert (mid, seq, out.loss_fn, out.forward_only) == ("s:train:0", 3, "ppo", False)
    assert out.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7)}
    d = out.data[0]
    assert d.tokens.tolist() == [1, 2, 3] and d.tokens.dtype == torch.int64
    assert torch.equal(d.loss_fn_inputs["target_tokens"], targets_2d)
    assert d.loss_fn_inputs["weights"].shape == (3, 2)


def test_text_config_is_refused_except_for_custom() -> None:
    # only loss_fn "custom" takes a text option (its loss_id); elsewhere a text value would do nothing
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([2, 3], np.int64))},
    )

    def body(loss_fn: str) -> bytes:
        fb = types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn, loss_fn_config={"loss_id": "x"})  # type: ignore[arg-type]
        req = types.ForwardBackwardRequest(model_id="s:train:0", seq_id=1, forward_backward_input=fb)
        return forward_backward_request_to_proto(req).SerializeToString()

    with pytest.raises(UserError, match="loss_fn_config.loss_id"):
        decode_forward_backward(body("ppo"))
    assert decode_forward_backward(body("custom"))[2].loss_fn == "custom"


def test_garbage_is_a_user_error() -> None:
    with pytest.raises(UserError, match="body"):
        decode_forward_backward(b"\xff\xff\xff\xff")


def test_forward_backward_output_roundtrip() -> None:
    res = ForwardBackwardResult(
        loss_fn_outputs=[
            {"logprobs": torch.tensor([-1.0, -2.0]), "elementwise_loss": torch.tensor([1.0, 2.0])},
            {"logprobs": torch.tensor([[-0.5, -3.0]] * 3), "elementwise_loss": torch.tensor([0.1, 0.2, 0.3])},
        ],
        metrics={"loss:sum": 3.6},
    )
    proto = encode_forward_backward(res).proto
    assert proto is not None
    out = deserialize_forward_backward_output(proto)
    assert out.metrics == {"loss:sum": pytest.approx(3.6)}
    assert out.loss_fn_outputs[0]["logprobs"].to_torch().tolist() == [-1.0, -2.0]
    assert out.loss_fn_outputs[1]["logprobs"].to_torch().shape == (3, 2)
    assert out.loss_fn_outputs[1]["elementwise_loss"].to_torch().shape == (3,)


def test_sample_response_roundtrip() -> None:
    req = SampleRequest(
        None, [1, 2, 3], SamplingParams(), num_samples=2, prompt_logprobs=True, topk_prompt_logprobs=2
    )
    res = SampleResult(
        sequences=[SampledSequence([4, 5], [-0.1, -0.2], "stop"), SampledSequence([6], [-0.3], "length")],
        prompt_logprobs=[math.nan, -1.5, -2.5],
        topk_prompt_logprobs=[[], [(7, -0.5)], [(8, -0.25), (9, -1.0)]],
    )
    proto = encode_sample(res, req).proto
    assert proto is not None
    out = deserialize_sample_response(proto)
    assert [s.tokens for s in out.sequences] == [[4, 5], [6]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx([-1.5, -2.5])
    assert out.topk_prompt_logprobs is not None
    assert out.topk_prompt_logprobs[2] == [(8, pytest.approx(-0.25)), (9, pytest.approx(-1.0))]
    assert out.topk_prompt_logprobs[1] is not None and out.topk_prompt_logprobs[1][0][0] == 7
