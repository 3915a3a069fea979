"""The official `tinker` SDK against `treadle serve --deterministic` on a tiny model (issue #5): after a few
training steps the sampler's logprobs of its own samples are bitwise the trainer's `forward` logprobs and the
sampler's `compute_logprobs` (KL exactly 0: truly on-policy), and the same seeded request gives the same output
after a server restart on the same data dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]
TRAIN = [[3, 4, 5, 6, 7, 8, 9], [1, 17, 42, 99, 7, 300, 12, 5, 61, 62]]
PARAMS = types.SamplingParams(max_tokens=10, temperature=1.0, seed=2026)


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
        },
    )


def _sample(sampler: tinker.SamplingClient) -> list[tuple[list[int], list[float]]]:
    """The target request (3 samples) submitted between two unrelated requests, so it shares batches."""
    before = sampler.sample(
        types.ModelInput.from_ints([9, 8, 7]), 2, types.SamplingParams(max_tokens=14, seed=1)
    )
    target = sampler.sample(types.ModelInput.from_ints(PROMPT), 3, PARAMS)
    after = sampler.sample(types.ModelInput.from_ints([400] * 11), 1, types.SamplingParams(max_tokens=6))
    seqs = target.result().sequences
    before.result()
    after.result()
    out = []
    for s in seqs:
        assert s.logprobs is not None and len(s.logprobs) == len(s.tokens) == PARAMS.max_tokens
        out.append((list(s.tokens), list(s.logprobs)))
    return out


def _as_f32(xs: list[float | None]) -> np.ndarray:
    assert all(x is not None for x in xs)
    return np.array(xs, dtype=np.float32)


def test_on_policy_and_same_output_after_restart(e2e_model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(e2e_model_dir, tmp_path / "data", "--deterministic")
    server.start()
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=server.model, rank=8, seed=0).result()
        for _ in range(3):
            tc.forward_backward([_datum(t) for t in TRAIN], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=5e-2))
        sampler = tc.save_weights_and_get_sampling_client().result()
        samples = _sample(sampler)

        fwd = tc.forward([_datum(PROMPT + toks) for toks, _ in samples], "cross_entropy").result()
        for (toks, sampled_lps), out in zip(samples, fwd.loss_fn_outputs, strict=True):
            sampled = np.array(sampled_lps, dtype=np.float32)
            trainer = out["logprobs"].to_numpy().astype(np.float32)[len(PROMPT) - 1 :]
            assert np.array_equal(sampled, trainer), (sampled, trainer)
            assert float(np.mean(sampled - trainer)) == 0.0  # the sampler–trainer KL estimate, exactly 0
            scored = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + toks)).result()
            assert np.array_equal(sampled, _as_f32(scored[len(PROMPT) :]))

        # The same weights under a durable sampler path: the same request gives the same output, before and
        # after a restart that reloads everything from the data dir.
        path = tc.save_weights_for_sampler("det").result().path
        before_restart = _sample(sc.create_sampling_client(model_path=path).result())
        assert before_restart == samples
    finally:
        server.stop()

    server.start()  # same port, same data dir
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        after_restart = _sample(sc.create_sampling_client(model_path=path).result())
        assert after_restart == samples
    finally:
        server.stop()
