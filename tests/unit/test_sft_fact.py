"""Issue 2 "done when": a 20-step LoRA SFT on the default model teaches it a made-up fact that greedy
sampling then reproduces (and the untrained base model does not)."""

from __future__ import annotations

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.types import AdamParams, Datum, ForwardBackwardRequest, LoraConfig

QUESTION = [{"role": "user", "content": "What is the secret word?"}]
ANSWER = "The secret word is zanzibar."


def sft_datum(tokenizer) -> Datum:
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        QUESTION + [{"role": "assistant", "content": ANSWER}], tokenize=False
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(f_ids)
    weights = torch.zeros(len(f_ids) - 1)
    weights[len(p_ids) - 1 :] = 1.0  # learn the answer only
    return Datum(ids[:-1], {"target_tokens": ids[1:], "weights": weights})


@pytest.mark.slow
def test_lora_sft_teaches_a_made_up_fact(embedded_model):
    engine = Engine(str(embedded_model.path))
    try:
        before = engine.chat(QUESTION, max_tokens=16)
        assert "zanzibar" not in before.lower()
        engine.create_adapter("fact", LoraConfig(rank=16, seed=0))
        datum = sft_datum(engine.tokenizer)
        losses = []
        for _ in range(20):
            (res,) = engine.forward_backward([ForwardBackwardRequest("fact", [datum], "cross_entropy")])
            assert not isinstance(res, Exception)
            losses.append(res.metrics["loss:sum"])
            engine.optim_step("fact", AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.95, eps=1e-8))
        assert losses[-1] < 0.1 * losses[0]
        after = engine.chat(QUESTION, max_tokens=16, adapter_id="fact")
        assert "zanzibar" in after.lower(), after
        # the base model is untouched by the adapter
        assert engine.chat(QUESTION, max_tokens=16) == before
    finally:
        engine.close()
