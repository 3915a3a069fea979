"""The retained prefix cache through the official SDK (issue 10): a conversation's second turn, sampled from the
same `save_weights_and_get_sampling_client` snapshot, reuses the first turn's KV (the server's
`prompt_cache_hit_tokens`); a snapshot taken after a training step reuses none of it."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

PROMPT = [int(t) for t in np.random.default_rng(0).integers(100, 3000, 30)]
REPLY = [int(t) for t in np.random.default_rng(1).integers(100, 3000, 20)]


def _sample(sc: tinker.SamplingClient, prompt: list[int]) -> types.SampleResponse:
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    return sc.sample(types.ModelInput.from_ints(prompt), 1, params).result()


def test_second_turn_reuses_the_first(tinker_server: ServerProcess) -> None:
    service = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    before = tc.save_weights_and_get_sampling_client().result()
    first = _sample(before, PROMPT)
    generated = list(first.sequences[0].tokens)
    turn2 = PROMPT + generated + REPLY
    assert _sample(before, turn2).prompt_cache_hit_tokens == len(PROMPT) + len(generated) - 1

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(turn2[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(turn2[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(turn2) - 1, dtype=np.float32)),
        },
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = tc.save_weights_and_get_sampling_client().result()
    assert _sample(after, turn2).prompt_cache_hit_tokens == 0  # other weights: nothing reused
