"""PEFT interop for Qwen3-VL: a treadle adapter on the language model is written under transformers' module
names (`model.language_model.layers…`), so PEFT loads it into `Qwen3VLForConditionalGeneration` with the same
text logits, and treadle reads it (and its own older naming) back."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from treadle.engine.types import LoraConfig
from treadle.lora import AdapterBank
from treadle.models.loader import load_model


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_vl_adapter_loads_in_peft_with_same_logits(
    tiny_vl_dirs: dict[str, Path], tmp_path: Path, family: str
) -> None:
    from transformers import AutoModelForImageTextToText

    d = tiny_vl_dirs[family]
    model = load_model(str(d)).model
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bank.trainable_parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    bank.save("a", tmp_path / "a", optimizer=False, base_model=str(d))
    names = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert all(
        n.startswith("base_model.model.model.language_model.") or n.startswith("base_model.model.lm_head.")
        for n in names
    ), sorted(names)[:3]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4

    vocab = model.config.vocab_size
    tokens = torch.randint(0, min(vocab, 1000), (2, 9), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a"))
    with torch.no_grad():
        peft_logits = pm(input_ids=tokens).logits
        hook = bank.hook(["a", "a"])
        ours = model.logits(model(tokens, lora=hook), hook)
    assert (peft_logits - ours).abs().max() <= 1e-4

    # and back: treadle reads the transformers-named file into an equal adapter
    bank.load("b", tmp_path / "a", optimizer=False)
    for pa, pb in zip(bank.trainable_parameters("a"), bank.trainable_parameters("b"), strict=True):
        assert torch.equal(pa, pb)
