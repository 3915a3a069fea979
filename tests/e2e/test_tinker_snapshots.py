"""In-memory sampler snapshots (`save_weights_and_get_sampling_client`): the newest `--ephemeral-samplers` per
run stay usable, an older one answers 404 saying why and how to keep more, and the run trains on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess


@pytest.fixture(scope="module")
def server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(
        e2e_model_dir, tmp_path_factory.mktemp("snapshots") / "data", "--ephemeral-samplers", "2"
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_oldest_snapshot_is_released_with_a_clear_error(server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4).result()
    toks = [1, 5, 9, 13, 17]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )
    samplers = []
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        samplers.append(tc.save_weights_and_get_sampling_client())
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=3, seed=1)
    for recent in samplers[1:]:
        assert len(recent.sample(prompt, 1, params).result().sequences[0].tokens) == 3
    with pytest.raises(tinker.NotFoundError, match="ephemeral-samplers"):
        samplers[0].sample(prompt, 1, params).result()
    assert tc.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
