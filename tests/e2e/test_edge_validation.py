"""Validation at the edge, through the official SDK against a real `treadle serve` (issue 12 §4): a bad
forward_backward datum or sample request is refused with a 400 naming the field (the answer to the POST that
would have returned a request id: no future exists), and costs nothing else — the training client's later ops
(numbered after the refused ones) run, and the model's weights are exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


def _datum(inputs: list[int], targets: list[int], **extra: types.TensorData) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(targets, dtype=np.int64)),
            **extra,
        },
    )


GOOD = _datum([1, 5, 9, 13], [5, 9, 13, 17])


def test_a_bad_datum_is_a_400_naming_the_field_and_costs_nothing(tinker_server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    cap = sc.get_server_capabilities().supported_models[0]
    ctx = cap.max_context_length
    assert ctx is not None
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4, seed=7).result()
    tok = tc.get_tokenizer()
    vocab = len(tok)
    before = tc.forward([GOOD], "cross_entropy").result(timeout=60).loss_fn_outputs[0]["logprobs"].tolist()

    bad = [
        (_datum([1, vocab + 5], [2, 3]), r"data\[0\]\.model_input: token ids must be in 0\.\."),
        (_datum([1] * (ctx + 1), [1] * (ctx + 1)), r"data\[0\]\.model_input: .*max_context_length"),
        (_datum([1, 2, 3], [2, 3]), r"data\[0\]\.loss_fn_inputs\.target_tokens"),
        (
            _datum([1, 2], [2, 3], weights=types.TensorData(data=[1.0], dtype="float32", shape=[1])),
            r"data\[0\]\.loss_fn_inputs\.weights: must have the shape",
        ),
    ]
    for datum, says in bad:
        with pytest.raises(tinker.BadRequestError, match=says):
            tc.forward_backward([datum], "cross_entropy").result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match=r"data\[1\]\.model_input"):
        tc.forward_backward([GOOD, _datum([1, vocab + 5], [2, 3])], "cross_entropy").result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="loss_fn"):
        tc.forward_backward([GOOD], "no_such_loss").result(timeout=60)  # type: ignore[arg-type]

    # Nothing ran: the weights are bitwise as before, and the ops numbered after the refused ones run.
    after = tc.forward([GOOD], "cross_entropy").result(timeout=60).loss_fn_outputs[0]["logprobs"].tolist()
    assert after == before
    loss = tc.forward_backward([GOOD], "cross_entropy").result(timeout=60).metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=60)
    assert tc.forward_backward([GOOD], "cross_entropy").result(timeout=60).metrics["loss:sum"] < loss


def test_a_bad_sample_is_a_400_naming_the_field(tinker_server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    sampler = sc.create_sampling_client(base_model=tinker_server.model).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(tinker.BadRequestError, match=r"topk_prompt_logprobs: must be an integer in 0\.\.100"):
        sampler.sample(
            prompt,
            1,
            types.SamplingParams(max_tokens=2),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=101,
        ).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="num_samples: must be an integer in 1.."):
        sampler.sample(prompt, 10_000, types.SamplingParams(max_tokens=2)).result(timeout=60)
    assert (
        len(sampler.sample(prompt, 2, types.SamplingParams(max_tokens=2)).result(timeout=60).sequences) == 2
    )
