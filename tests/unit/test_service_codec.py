"""Wire codec against the SDK's own converters: what the SDK encodes decodes to the right tensors (dense and
sparse CSR 2-D), and what treadle encodes the SDK decodes back exactly (ragged outputs, NaN, top-k). A future's
domain result gives the same wire bytes whether it comes from memory or back from its stored payload."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from treadle.api.tinker.codec import (
    HEAVY_ELEMENTS,
    decode_forward_backward,
    encode_forward_backward,
    encode_sample,
    is_heavy,
    to_wire,
)
from treadle.engine.types import (
    ForwardBackwardResult,
    SampledSequence,
    SampleRequest,
    SampleResult,
    SamplingParams,
)
from treadle.errors import UserError
from treadle.service import results
from treadle.service.results import Sampled


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
    proto = encode_forward_backward(res)
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
    proto = encode_sample(Sampled(res, req.topk_sample_logprobs, req.topk_prompt_logprobs))
    out = deserialize_sample_response(proto)
    assert [s.tokens for s in out.sequences] == [[4, 5], [6]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx([-1.5, -2.5])
    assert out.topk_prompt_logprobs is not None
    assert out.topk_prompt_logprobs[2] == [(8, pytest.approx(-0.25)), (9, pytest.approx(-1.0))]
    assert out.topk_prompt_logprobs[1] is not None and out.topk_prompt_logprobs[1][0][0] == 7


def _stored(result: results.Result) -> results.Result:
    """`result` after the futures table: dumped to its payload and read back."""
    text, blob = results.dump(result)
    assert (text is None) != (blob is None)
    return results.load(text, blob)


def test_forward_backward_payload_gives_the_same_wire_bytes() -> None:
    batch_B_T = torch.randn(2, 5)  # per-datum outputs are views of one batch tensor, as the engine makes them
    res = ForwardBackwardResult(
        loss_fn_outputs=[
            {
                "logprobs": batch_B_T[0, :3],
                "ids": torch.tensor([[1, 2]] * 3),
                "half": torch.ones(3).bfloat16(),
            },
            {"logprobs": batch_B_T[1], "ids": torch.tensor([[3, 4]] * 5), "half": torch.ones(5).bfloat16()},
        ],
        metrics={"loss:sum": 1 / 3, "nan:mean": math.nan},
    )
    again = _stored(res)
    assert isinstance(again, ForwardBackwardResult)
    assert [list(d) for d in again.loss_fn_outputs] == [list(d) for d in res.loss_fn_outputs]
    assert torch.equal(again.loss_fn_outputs[1]["half"], res.loss_fn_outputs[1]["half"])
    assert to_wire(again) == to_wire(res)
    out = deserialize_forward_backward_output(encode_forward_backward(again))
    assert out.loss_fn_outputs[1]["ids"].to_torch().tolist() == [[3, 4]] * 5


def test_sample_payload_gives_the_same_wire_bytes() -> None:
    ids_R_K = torch.tensor([[3, -1], [-1, -1], [4, 5]])
    res = SampleResult(
        sequences=[
            SampledSequence([4, 5], [-0.1, -1 / 3], "stop", [[(4, -0.1), (9, -2.0)], [(5, -1 / 3)]]),
            SampledSequence([], [], "length", []),
        ],
        prompt_logprobs=[None, -1.5, math.nan, -2.5],  # type: ignore[list-item]
        topk_prompt_logprobs=[[], [(7, -0.5)], [(8, -0.25), (9, -1.0)], []],
        prompt_cache_hit_tokens=3,
        target_prompt_logprobs=torch.tensor([[-1.0, 0.0], [0.0, 0.0], [-2.0, -3.0]]),
        prompt_alt_tokens=(torch.tensor([[1, 2]] * 3), torch.tensor([[-0.5, -0.75]] * 3)),
    )
    for sparse in (True, False):
        sampled = Sampled(
            res, topk_sample_logprobs=2, topk_prompt_logprobs=2, target_ids=ids_R_K, target_sparse=sparse
        )
        again = _stored(sampled)
        assert isinstance(again, Sampled)
        assert again.result.sequences == res.sequences and again.result.prompt_logprobs[0] is None  # type: ignore[index]
        assert to_wire(again) == to_wire(sampled)
        out = deserialize_sample_response(encode_sample(again))
        assert out.sequences[0].logprobs == pytest.approx([-0.1, -1 / 3])


@pytest.mark.parametrize(
    ("result", "wire"),
    [
        (results.ModelCreated("s:train:0"), {"model_id": "s:train:0", "type": "create_model"}),
        (results.Optimized({"loss:sum": 0.1}), {"metrics": {"loss:sum": 0.1}, "type": "optim_step"}),
        (
            results.WeightsSaved("tinker://r/weights/a", "weights"),
            {"path": "tinker://r/weights/a", "type": "save_weights"},
        ),
        (
            results.WeightsSaved("tinker://r/sampler_weights/a", "sampler_weights"),
            {"path": "tinker://r/sampler_weights/a", "type": "save_weights_for_sampler"},
        ),
        (
            results.ExternalWeightsSaved("tinker://r/external_weights/a", 12),
            {"path": "tinker://r/external_weights/a", "size_bytes": 12, "type": "save_weights_external"},
        ),
        (
            results.WeightsLoaded("tinker://r/weights/a", "s:train:1"),
            {"path": "tinker://r/weights/a", "model_id": "s:train:1", "type": "load_weights"},
        ),
        (
            results.SamplerSnapshot("s:sample:2"),
            {"sampling_session_id": "s:sample:2", "type": "save_weights_for_sampler"},
        ),
        (
            results.CustomLossCreated("s:custom_loss:0"),
            {"loss_id": "s:custom_loss:0", "type": "create_custom_loss"},
        ),
    ],
)
def test_scalar_results_store_as_json_and_answer_with_their_type(
    result: results.Result, wire: dict[str, object]
) -> None:
    again = _stored(result)
    assert again == result and to_wire(again) == wire


def test_an_unreadable_payload_is_a_clear_error() -> None:
    for text, blob in [('{"metrics": {}, "type": "optim_step"}', None), (None, b"\x08\x01garbage")]:
        with pytest.raises(results.PayloadError, match="submit again"):
            results.load(text, blob)


def test_only_large_results_are_encoded_off_the_event_loop() -> None:
    def fb(n: int) -> ForwardBackwardResult:
        return ForwardBackwardResult([{"logprobs": torch.zeros(n)}], {})

    assert not is_heavy(fb(8)) and is_heavy(fb(HEAVY_ELEMENTS + 1))
    big = SampleResult([SampledSequence([1] * (HEAVY_ELEMENTS + 1), [0.0] * (HEAVY_ELEMENTS + 1), "length")])
    assert is_heavy(Sampled(big)) and not is_heavy(results.Optimized({}))
