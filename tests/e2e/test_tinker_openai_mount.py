"""The OpenAI API mounted on the same `treadle serve`: same keys, and an adapter trained through the Tinker
API is served by its `tinker://` path (the service's OpenAI backend resolves and loads it)."""

from __future__ import annotations

import pytest
import tinker
from openai import NotFoundError, OpenAI

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


def test_trained_adapter_is_served_over_openai(tinker_server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    sampler_path = tc.save_weights_for_sampler("for-openai").result().path

    client = OpenAI(base_url=tinker_server.base_url + "/v1", api_key=API_KEY)
    # the served base model, plus any deployments other tests made on this shared server
    listed = client.models.list().data
    assert [m.id for m in listed if m.owned_by != "deployment"] == [tinker_server.model]
    for model in (tinker_server.model, sampler_path):
        out = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
        assert out.choices[0].text is not None
    with pytest.raises(NotFoundError):
        client.completions.create(model="tinker://nope:train:0/sampler_weights/x", prompt="Hi", max_tokens=2)
