"""REST runs/checkpoints/sessions through the SDK's RestClient: publish, TTL, copy, lookups by path."""

from __future__ import annotations

import pytest
import tinker

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


def test_rest_checkpoint_lifecycle(tinker_server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(
        base_model=tinker_server.model, rank=4, user_metadata={"k": "v"}
    ).result()
    state = tc.save_state("r1", ttl_seconds=7200).result().path
    rest = tinker.RestClient(base_url=tinker_server.base_url, api_key=API_KEY)

    ck = next(c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == state)
    assert ck.checkpoint_type == "training" and ck.expires_at is not None and not ck.public
    assert ck.size_bytes and ck.size_bytes > 0
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()
    rest.publish_checkpoint_from_tinker_path(state).result()
    ck = next(c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == state)
    assert ck.expires_at is None and ck.public
    rest.unpublish_checkpoint_from_tinker_path(state).result()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        rest.set_checkpoint_ttl_from_tinker_path(state, -5).result()

    assert rest.get_training_run_by_tinker_path(state).result().training_run_id == tc.model_id
    assert tc.model_id in [
        r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs
    ]

    copied = rest.copy_weights(state, "proj").result()
    assert copied != state and copied.endswith("/weights/r1")
    info = rest.get_weights_info_by_tinker_path(copied).result()
    assert info.lora_rank == 4 and info.base_model == tinker_server.model
    loaded = sc.create_training_client_from_state(copied).result()  # the copy is loadable like the original
    assert loaded.get_info().lora_rank == 4

    session_id = sc.holder.get_session_id()
    assert session_id in rest.list_sessions(limit=100).result().sessions
    sess = rest.get_session(session_id).result()
    assert tc.model_id in sess.training_run_ids
    sampler = tc.save_weights_and_get_sampling_client().result()
    sampler_id = sampler._sampling_session_id
    assert sampler_id in rest.get_session(session_id).result().sampler_ids
    assert rest.get_sampler(sampler_id).result().base_model == tinker_server.model
