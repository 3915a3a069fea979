"""The official `tinker` SDK (0.38.0), unmodified, against a real `treadle serve` subprocess on a tiny model:
training with every loss, sampling features, checkpoints save/load, REST runs/checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]


@pytest.fixture(scope="module")
def sc(tinker_server: ServerProcess) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)


@pytest.fixture(scope="module")
def base_model(tinker_server: ServerProcess) -> str:
    return tinker_server.model


def _ints(xs: list[int]) -> types.TensorData:
    return types.TensorData.from_numpy(np.array(xs, dtype=np.int64))


def _floats(xs: list[float]) -> types.TensorData:
    return types.TensorData.from_numpy(np.array(xs, dtype=np.float32))


def _sl_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": _ints(tokens[1:]), "weights": _floats([1.0] * (len(tokens) - 1))},
    )


def _rl_datum(tokens: list[int], adv: float) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": _ints(tokens[1:]),
            "logprobs": _floats([-2.0] * n),
            "advantages": _floats([adv] * n),
        },
    )


def test_capabilities_and_info(sc: tinker.ServiceClient, base_model: str) -> None:
    caps = sc.get_server_capabilities()
    names = [m.model_name for m in caps.supported_models]
    assert names == [base_model]
    assert caps.supported_models[0].max_context_length and caps.supported_models[0].max_context_length > 0
    tc = sc.create_lora_training_client(
        base_model=base_model, rank=4, user_metadata={"renderer_name": "x"}
    ).result()
    info = tc.get_info()
    assert info.model_data.model_name == base_model
    assert info.lora_rank == 4
    tok = tc.get_tokenizer()  # the tokenizer_id is a local directory, so this works offline
    assert tok.encode("hello")


def test_training_loop_reduces_loss(sc: tinker.ServiceClient, base_model: str) -> None:
    tc = sc.create_lora_training_client(base_model=base_model, rank=8, seed=0).result()
    data = [_sl_datum(PROMPT), _sl_datum([3, 4, 5, 6, 7])]
    fwd = tc.forward(data, "cross_entropy").result()
    first = tc.forward_backward(data, "cross_entropy").result()
    # forward computes no gradient and forward_backward sees the same weights: equal losses.
    assert fwd.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"], rel=1e-5)
    assert len(first.loss_fn_outputs) == 2
    lp = first.loss_fn_outputs[0]["logprobs"].to_torch()
    assert lp.shape == (len(PROMPT) - 1,)
    assert -first.metrics["loss:sum"] == pytest.approx(
        sum(float(o["logprobs"].to_torch().sum()) for o in first.loss_fn_outputs), rel=1e-4
    )
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert all(k.count(":") <= 1 for k in opt.metrics or {})
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2))
    last = tc.forward(data, "cross_entropy").result()
    assert last.metrics["loss:sum"] < first.metrics["loss:sum"]


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_every_rl_loss(sc: tinker.ServiceClient, base_model: str, loss_fn: types.LossFnType) -> None:
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()
    out = tc.forward_backward([_rl_datum(PROMPT, 1.0), _rl_datum(PROMPT[:5], -0.5)], loss_fn).result()
    assert all(k.count(":") == 1 for k in out.metrics)
    assert [o["logprobs"].to_torch().shape[0] for o in out.loss_fn_outputs] == [len(PROMPT) - 1, 4]
    assert all(math.isfinite(v) for v in out.metrics.values())
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_custom_loss_runs_client_side(sc: tinker.ServiceClient, base_model: str) -> None:
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()

    def loss_fn(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = -sum(lp.sum() for lp in logprobs)
        assert isinstance(loss, torch.Tensor)
        return loss, {"custom:sum": float(loss)}

    out = tc.forward_backward_custom([_sl_datum(PROMPT)], loss_fn).result()
    assert out.metrics["custom:sum"] > 0


def test_sampling_features(sc: tinker.ServiceClient, base_model: str) -> None:
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=123)
    a = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    b = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    assert len(a.sequences) == 3
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]  # same seed, same samples
    for s in a.sequences:
        assert s.logprobs is not None and len(s.logprobs) == len(s.tokens)
        assert s.stop_reason == "length" and len(s.tokens) == 6

    # A stop token is included in the returned tokens and ends the sequence.
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    free = sampler.sample(prompt, num_samples=1, sampling_params=greedy).result().sequences[0]
    stop_tok = free.tokens[2]
    stopped = (
        sampler.sample(
            prompt,
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0, stop=[stop_tok]),
        )
        .result()
        .sequences[0]
    )
    assert stopped.tokens == free.tokens[: free.tokens.index(stop_tok) + 1]
    assert stopped.stop_reason == "stop"

    res = sampler.sample(
        prompt, num_samples=1, sampling_params=greedy, include_prompt_logprobs=True, topk_prompt_logprobs=3
    ).result()
    assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == len(PROMPT)
    assert res.prompt_logprobs[0] is None and all(v is not None and v <= 0 for v in res.prompt_logprobs[1:])
    assert res.topk_prompt_logprobs is not None and len(res.topk_prompt_logprobs) == len(PROMPT)
    top = res.topk_prompt_logprobs[1]
    assert top is not None and len(top) == 3
    actual = res.prompt_logprobs[1]
    assert (
        actual is not None and top[0][1] >= actual - 1e-4
    )  # the best alternative is at least the actual token

    lps = sampler.compute_logprobs(prompt).result()
    np.testing.assert_allclose(
        np.array(lps[1:], dtype=float), np.array(res.prompt_logprobs[1:], dtype=float), rtol=1e-4, atol=1e-4
    )


def test_forward_logprobs_match_sampler(sc: tinker.ServiceClient, base_model: str) -> None:
    """Invariant 1 across the wire: training forward and sampler prompt logprobs agree."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=4, seed=3).result()
    tc.forward_backward([_sl_datum(PROMPT)], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    fwd = tc.forward([_sl_datum(PROMPT)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    lps = (
        tc.save_weights_and_get_sampling_client()
        .result()
        .compute_logprobs(types.ModelInput.from_ints(PROMPT))
        .result()
    )
    np.testing.assert_allclose(np.array(lps[1:], dtype=float), fwd.numpy(), rtol=1e-4, atol=1e-4)


def test_base_model_sampling(sc: tinker.ServiceClient, base_model: str) -> None:
    sampler = sc.create_sampling_client(base_model=base_model).result()
    out = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=3)).result()
    assert len(out.sequences[0].tokens) <= 3


def test_save_and_load_state(sc: tinker.ServiceClient, base_model: str, tinker_server: ServerProcess) -> None:
    tc = sc.create_lora_training_client(
        base_model=base_model, rank=4, seed=1, user_metadata={"renderer_name": "r"}
    ).result()
    data = [_sl_datum(PROMPT)]
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    state = tc.save_state("step1").result().path
    assert state.endswith("/weights/step1")
    sampler_path = tc.save_weights_for_sampler("step1").result().path
    assert "/sampler_weights/" in sampler_path

    # Continue one step on the original; the resumed copy must reach the same loss.
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    cont = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]

    resumed = sc.create_training_client_from_state_with_optimizer(state).result()
    resumed.forward_backward(data, "cross_entropy")
    resumed.optim_step(types.AdamParams(learning_rate=1e-2))
    assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        cont, rel=1e-5
    )

    # Weights-only load, and the legacy in-place load_state, both restore the saved weights.
    at_save = (
        sc.create_training_client_from_state(state)
        .result()
        .forward(data, "cross_entropy")
        .result()
        .metrics["loss:sum"]
    )
    tc.load_state(state).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(at_save, rel=1e-5)

    # A named sampler checkpoint samples the saved weights.
    from_path = sc.create_sampling_client(model_path=sampler_path).result()
    lp_path = from_path.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
    assert len(lp_path) == len(PROMPT)

    rest = tinker.RestClient(base_url=tinker_server.base_url, api_key=API_KEY)
    run = rest.get_training_run(tc.model_id).result()
    assert run.user_metadata == {"renderer_name": "r"}
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state
    cks = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id for c in cks} == {"weights/step1", "sampler_weights/step1"}
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert info.lora_rank == 4 and info.base_model == base_model
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    assert {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints} == {
        "weights/step1"
    }
    with pytest.raises(Exception, match="404|no checkpoint"):
        sc.create_sampling_client(model_path=sampler_path).result().compute_logprobs(
            types.ModelInput.from_ints(PROMPT)
        ).result()


def test_overwritten_sampler_checkpoint_serves_new_weights(sc: tinker.ServiceClient, base_model: str) -> None:
    tc = sc.create_lora_training_client(base_model=base_model, rank=4, seed=9).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    path = tc.save_weights_for_sampler("same").result().path
    before = sc.create_sampling_client(model_path=path).result().compute_logprobs(prompt).result()
    for _ in range(2):
        tc.forward_backward([_sl_datum(PROMPT)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
    assert tc.save_weights_for_sampler("same").result().path == path
    after = sc.create_sampling_client(model_path=path).result().compute_logprobs(prompt).result()
    fresh = tc.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    np.testing.assert_allclose(np.array(after[1:], dtype=float), np.array(fresh[1:], dtype=float), atol=1e-4)
    assert not np.allclose(np.array(after[1:], dtype=float), np.array(before[1:], dtype=float), atol=1e-3)
