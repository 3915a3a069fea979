"""Every SDK 0.38 sampling and scoring option against a real `treadle serve`, each checked against a reference
computed with `forward` (a fresh LoRA adapter is the base model, B = 0): topk_sample_logprobs,
target_prompt_logprobs (dense and sparse), prompt_alt_tokens_k, prompt_logprobs_last_n; zstd request bodies;
true per-model capabilities; and the documented refusal of record_stability_info / stable_reinforce."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
import torch
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.e2e.conftest import API_KEY, E2E_MAX_REQUEST_MB, ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 42, 99, 7, 30, 12, 5, 64, 3]


@pytest.fixture(scope="module")
def sc(tinker_server: ServerProcess) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)


@pytest.fixture(scope="module")
def clients(
    sc: tinker.ServiceClient, tinker_server: ServerProcess
) -> tuple[tinker.SamplingClient, tinker.TrainingClient]:
    sampler = sc.create_sampling_client(base_model=tinker_server.model)
    trainer = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    return sampler, trainer


def _forward_logprobs(tc: tinker.TrainingClient, inputs: list[int], targets_N_K: torch.Tensor) -> np.ndarray:
    """Reference: `forward` scoring each position's K target ids (cross_entropy takes (N, K) targets)."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": types.TensorData.from_torch(targets_N_K.long())},
    )
    out = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    return out.to_numpy().reshape(targets_N_K.shape)


def test_topk_sample_logprobs(clients: tuple[tinker.SamplingClient, tinker.TrainingClient]) -> None:
    sampler, tc = clients
    res = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[]),
        topk_sample_logprobs=4,
    ).result()
    seq = res.sequences[0]
    assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens) == 6
    ids = torch.tensor([[t for t, _ in row] for row in seq.topk_logprobs if row is not None])
    lps = np.array([[lp for _, lp in row] for row in seq.topk_logprobs if row is not None])
    assert ids.shape == (6, 4) and (np.diff(lps, axis=1) <= 0).all()  # most likely first
    full = PROMPT + seq.tokens
    # the sampled positions are predicted from PROMPT + tokens[:i]: score the whole sequence, keep the tail
    inputs = full[:-1]
    targets = torch.zeros(len(inputs), 4, dtype=torch.long)
    targets[len(PROMPT) - 1 :] = ids
    ref = _forward_logprobs(tc, inputs, targets)[len(PROMPT) - 1 :]
    np.testing.assert_allclose(lps, ref, atol=1e-4)


def test_target_prompt_logprobs_dense_and_sparse(
    clients: tuple[tinker.SamplingClient, tinker.TrainingClient],
) -> None:
    sampler, tc = clients
    n = len(PROMPT) - 1
    ids = torch.full((n, 3), -1, dtype=torch.long)
    ids[:, 0] = torch.tensor(PROMPT[1:])  # the actual next tokens
    ids[2, 1], ids[5, 2], ids[8, 1] = 11, 77, 0
    ref = _forward_logprobs(tc, PROMPT[:-1], ids.clamp(min=0))
    want = np.where(ids.numpy() >= 0, ref, 0.0)
    for target in (types.TensorData.from_torch(ids), types.TensorData.from_torch_sparse(ids, pad_value=-1)):
        res = sampler.sample(
            types.ModelInput.from_ints(PROMPT),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True,
            target_prompt_logprobs=target,
        ).result()
        assert res.target_prompt_logprobs is not None
        # answered in the request's layout: sparse in, sparse out (the listed cells only)
        sent_sparse = target.sparse_crow_indices is not None
        assert (res.target_prompt_logprobs.sparse_crow_indices is not None) == sent_sparse
        got = res.target_prompt_logprobs.to_torch().numpy()
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, want, atol=1e-4)
        # column 0 is the prompt's own next token: the same as prompt_logprobs
        assert res.prompt_logprobs is not None
        np.testing.assert_allclose(got[:, 0], np.array(res.prompt_logprobs[1:], dtype=np.float32), atol=1e-5)


def test_prompt_alt_tokens(clients: tuple[tinker.SamplingClient, tinker.TrainingClient]) -> None:
    sampler, tc = clients
    n, k = len(PROMPT) - 1, 5
    res = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=1.0, seed=11),
        prompt_alt_tokens_k=k,
    ).result()
    assert res.prompt_alt_tokens is not None
    alt_ids = res.prompt_alt_tokens.tokens.to_torch()
    alt_lps = res.prompt_alt_tokens.logprobs.to_torch().numpy()
    assert tuple(alt_ids.shape) == (n, k) and tuple(alt_lps.shape) == (n, k)
    np.testing.assert_allclose(alt_lps, _forward_logprobs(tc, PROMPT[:-1], alt_ids), atol=1e-4)
    # seeded: the same request draws the same alternatives
    again = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=1.0, seed=11),
        prompt_alt_tokens_k=k,
    ).result()
    assert again.prompt_alt_tokens is not None
    assert torch.equal(again.prompt_alt_tokens.tokens.to_torch(), alt_ids)
    # temperature 0: every draw is the argmax, i.e. the top-1 prompt logprob's token
    greedy = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0),
        prompt_alt_tokens_k=2,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=1,
    ).result()
    assert greedy.prompt_alt_tokens is not None and greedy.topk_prompt_logprobs is not None
    top1 = [row[0][0] for row in greedy.topk_prompt_logprobs[1:] if row]
    assert greedy.prompt_alt_tokens.tokens.to_torch()[:, 0].tolist() == top1


def test_prompt_logprobs_last_n(clients: tuple[tinker.SamplingClient, tinker.TrainingClient]) -> None:
    sampler, _ = clients
    kw = {
        "num_samples": 1,
        "sampling_params": types.SamplingParams(max_tokens=1),
        "include_prompt_logprobs": True,
    }
    full = sampler.sample(types.ModelInput.from_ints(PROMPT), topk_prompt_logprobs=2, **kw).result()
    last = sampler.sample(
        types.ModelInput.from_ints(PROMPT), topk_prompt_logprobs=2, prompt_logprobs_last_n=3, **kw
    ).result()
    assert full.prompt_logprobs is not None and last.prompt_logprobs is not None
    assert last.prompt_logprobs[:-3] == [None] * (len(PROMPT) - 3)
    np.testing.assert_allclose(
        np.array(last.prompt_logprobs[-3:], dtype=np.float64),
        np.array(full.prompt_logprobs[-3:], dtype=np.float64),
        atol=1e-6,
    )
    assert last.topk_prompt_logprobs is not None and full.topk_prompt_logprobs is not None
    assert last.topk_prompt_logprobs[:-3] == [None] * (len(PROMPT) - 3)
    assert last.topk_prompt_logprobs[-3:] == full.topk_prompt_logprobs[-3:]
    with pytest.raises(tinker.BadRequestError, match=r"prompt_logprobs_last_n: must be an integer in 1\.\.9"):
        sampler.sample(types.ModelInput.from_ints(PROMPT), prompt_logprobs_last_n=len(PROMPT), **kw).result()


def test_stable_reinforce_is_a_documented_refusal(
    sc: tinker.ServiceClient,
    clients: tuple[tinker.SamplingClient, tinker.TrainingClient],
    tinker_server: ServerProcess,
) -> None:
    stable = sc.create_sampling_client(base_model=tinker_server.model, record_stability_info=True)
    with pytest.raises(tinker.BadRequestError, match="record_stability_info.*objective"):
        stable.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2)).result()
    _, tc = clients
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(torch.tensor(PROMPT[1:])),
            "logprobs": types.TensorData.from_torch(torch.full((len(PROMPT) - 1,), -2.0)),
            "advantages": types.TensorData.from_torch(torch.ones(len(PROMPT) - 1)),
        },
    )
    with pytest.raises(tinker.BadRequestError, match="not published its objective"):
        tc.forward_backward([datum], "stable_reinforce").result()


def test_capabilities_report_true_limits(sc: tinker.ServiceClient, tinker_server: ServerProcess) -> None:
    caps = httpx.get(
        f"{tinker_server.base_url}/api/v1/get_server_capabilities", headers={"X-API-Key": API_KEY}
    ).json()
    (model,) = caps["supported_models"]
    # the tiny llama has no vision tower
    assert model["max_lora_rank"] == 128 and model["supports_images"] is False
    assert model["max_context_length"] > 0
    sdk = sc.get_server_capabilities().supported_models[0]
    assert sdk.max_context_length == model["max_context_length"]


def _fb_body(model_id: str, seq_id: int) -> bytes:
    msg = pb.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", forward_only=True
    )
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array(PROMPT[:-1], dtype="<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dense, t.dtype = np.array(PROMPT[1:], dtype=np.int64).tobytes(), pb.DTYPE_INT64
    t.shape.append(len(PROMPT) - 1)
    return msg.SerializeToString()


def test_zstd_bodies(sc: tinker.ServiceClient, tinker_server: ServerProcess) -> None:
    # the SDK itself compresses forward_backward when the client config says so (treadle says so)
    assert sc.holder.get_client_config().proto_compress_fwdbwd
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    plain = tc.forward([_datum()], "cross_entropy").result()  # sent compressed by the SDK
    assert plain.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (len(PROMPT) - 1,)
    url = f"{tinker_server.base_url}/api/v1/forward_backward"
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"}
    mid = tc.model_id
    bogus = httpx.post(url, content=b"x", headers={**headers, "Content-Encoding": "br"})
    assert bogus.status_code == 400 and "Content-Encoding" in bogus.text
    corrupt = httpx.post(url, content=b"not zstd", headers={**headers, "Content-Encoding": "zstd"})
    assert corrupt.status_code == 400 and "zstd" in corrupt.text
    # a small body that decompresses past the server's limit is refused, not expanded
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (E2E_MAX_REQUEST_MB * 2**20 + 1))
    assert len(bomb) < 4096
    big = httpx.post(url, content=bomb, headers={**headers, "Content-Encoding": "zstd"})
    assert big.status_code == 413
    ok = httpx.post(
        url,
        content=zstandard.ZstdCompressor().compress(_fb_body(mid, 10_000)),
        headers={**headers, "Content-Encoding": "zstd"},
    )
    assert ok.status_code == 200 and "request_id" in ok.json()


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_torch(torch.tensor(PROMPT[1:]))},
    )
