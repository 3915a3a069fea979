"""PEFT interop: treadle adapters load in `peft` with the same logits, and PEFT-made adapters load in treadle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers

from tests.small_models import load_small, write_small_checkpoint
from treadle.engine.types import LoraConfig
from treadle.errors import UserError
from treadle.lora import AdapterBank

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt"))


def hf_model(d: Path) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()


def treadle_logits(bank: AdapterBank, adapter_id: str) -> torch.Tensor:
    hook = bank.hook([adapter_id] * TOKENS.shape[0])
    with torch.no_grad():
        return bank.model.logits(bank.model(TOKENS, lora=hook), hook)


@pytest.mark.parametrize(
    "cfg", [LoraConfig(rank=4, seed=1), LoraConfig(rank=8, seed=2, alpha=8, train_mlp=False)]
)
def test_treadle_adapter_loads_in_peft_with_same_logits(
    llama_dir: Path, tmp_path: Path, cfg: LoraConfig
) -> None:
    bank = AdapterBank(load_small(llama_dir))
    bank.create("a", cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bank.trainable_parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    bank.save("a", tmp_path / "a", optimizer=True, base_model=str(llama_dir))
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == cfg.rank and conf["task_type"] == "CAUSAL_LM"

    base = hf_model(llama_dir)
    with torch.no_grad():
        base_logits = base(TOKENS).logits
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    with torch.no_grad():
        peft_logits = pm(TOKENS).logits
    ours = treadle_logits(bank, "a")
    assert (peft_logits - ours).abs().max() <= 1e-4
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter is really applied


def test_peft_made_adapter_loads_in_treadle_with_same_logits(llama_dir: Path, tmp_path: Path) -> None:
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    pm = peft.get_peft_model(hf_model(llama_dir), cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        peft_logits = pm(TOKENS).logits
    pm.save_pretrained(str(tmp_path / "p"))

    bank = AdapterBank(load_small(llama_dir))
    got = bank.load("p", tmp_path / "p", optimizer=False)
    assert (got.rank, got.scale, got.train_attn, got.train_mlp, got.train_unembed) == (
        4,
        4.0,
        True,
        True,
        False,
    )
    assert (treadle_logits(bank, "p") - peft_logits).abs().max() <= 1e-4
    with pytest.raises(UserError, match="optimizer"):
        bank.load("q", tmp_path / "p", optimizer=True)


def test_unsupported_peft_features_are_rejected(llama_dir: Path, tmp_path: Path) -> None:
    bank = AdapterBank(load_small(llama_dir))
    bank.create("a", LoraConfig(rank=4, seed=1))
    bank.save("a", tmp_path / "a", optimizer=False, base_model="tiny")
    (tmp_path / "a" / "treadle_adapter.json").unlink()  # make it look PEFT-made
    conf_path = tmp_path / "a" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        bank.load("b", tmp_path / "a", optimizer=False)
    conf_path.write_text(json.dumps(conf))
    assert bank.load("b", tmp_path / "a", optimizer=False).rank == 4
