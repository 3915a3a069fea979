"""Downloading weights the way the cookbook does (`tinker_cookbook.weights.download`: create-via-load,
age-encrypted `save_weights_external`, signed URLs fetched without auth, TTL renewal, delete), and the
result is a PEFT adapter that `transformers` + `peft` load to the same logprobs treadle computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

TOKENS = [1, 17, 42, 99, 7, 300, 12, 5]


def test_cookbook_download_is_a_peft_adapter(tinker_server: ServerProcess, tmp_path: Path) -> None:
    from peft import PeftModel
    from tinker_cookbook.weights import download
    from transformers import AutoModelForCausalLM

    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4, seed=5).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(TOKENS[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(TOKENS) - 1, dtype=np.float32)),
        },
    )
    tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2))
    ours = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    state = tc.save_state("dl").result().path

    out = tmp_path / "adapter"
    download(tinker_path=state, output_dir=str(out), base_url=tinker_server.base_url)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    base = AutoModelForCausalLM.from_pretrained(tinker_server.model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor([TOKENS[:-1]])).logits[0].float()
    theirs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None])[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)

    # The temporary encrypted export was deleted by the cookbook after the download.
    rest = tinker.RestClient(base_url=tinker_server.base_url, api_key=API_KEY)
    kinds = {c.checkpoint_type for c in rest.list_user_checkpoints(limit=100).result().checkpoints}
    assert "external" not in kinds
