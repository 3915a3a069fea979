"""With `--api-key`, only listed keys get in (401 otherwise) and each owner sees and loads only its own runs
and checkpoints (404 for another's), unless the checkpoint is published (invariant 7)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        e2e_model_dir,
        tmp_path_factory.mktemp("keyed") / "data",
        "--api-key",
        "tml-alice",
        "--api-key",
        "tml-bob",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _datum() -> types.Datum:
    toks = [1, 5, 9, 13, 17]
    return types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )


def test_keys_and_owners(keyed_server: ServerProcess) -> None:
    url = keyed_server.base_url
    r = httpx.post(url + "/api/v1/create_session", json={}, headers={"X-API-Key": "tml-eve"})
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]

    alice = tinker.ServiceClient(base_url=url, api_key="tml-alice")
    tc = alice.create_lora_training_client(base_model=keyed_server.model, rank=4).result()
    state = tc.save_state("mine").result().path
    alice_rest = tinker.RestClient(base_url=url, api_key="tml-alice")
    assert [c.tinker_path for c in alice_rest.list_user_checkpoints().result().checkpoints] == [state]

    bob = tinker.ServiceClient(base_url=url, api_key="tml-bob")
    bob_rest = tinker.RestClient(base_url=url, api_key="tml-bob")
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(tc.model_id).result()
    assert bob_rest.list_user_checkpoints().result().checkpoints == []
    assert bob_rest.list_training_runs().result().training_runs == []
    bob_http = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": "tml-bob"}, timeout=60)
    sid = bob_http.post("/create_session", json={}).json()["session_id"]
    r = bob_http.post(
        "/load_weights", json={"session_id": sid, "model_seq_id": 0, "path": state, "optimizer": False}
    )
    assert r.status_code == 404 and "path" in r.json()["detail"]
    r = bob_http.post("/optim_step", json={"model_id": tc.model_id, "seq_id": 1, "adam_params": {}})
    assert r.status_code == 404
    r = bob_http.delete(f"/training_runs/{tc.model_id}/checkpoints/weights/mine")
    assert r.status_code == 404
    # bob's refused ops on alice's model use up none of alice's seq_ids: her next ops still run in order
    for seq in range(1, 6):
        r = bob_http.post("/optim_step", json={"model_id": tc.model_id, "seq_id": seq, "adam_params": {}})
        assert r.status_code == 404
    assert tc.forward([_datum()], "cross_entropy").result(timeout=60).metrics["loss:sum"] > 0
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)

    # Published: bob may load it (weights only) but still not delete it.
    alice_rest.publish_checkpoint_from_tinker_path(state).result()
    copy = bob.create_training_client_from_state(state).result()
    assert copy.forward([_datum()], "cross_entropy").result().metrics["loss:sum"] > 0
    assert bob_http.delete(f"/training_runs/{tc.model_id}/checkpoints/weights/mine").status_code == 404
    bob_http.close()
