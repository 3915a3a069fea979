"""Every family, loaded through `load_model`, matches Hugging Face transformers on the same tiny checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from treadle.models.loader import LoadedModel, load_model
from treadle.models.tiny import write_tiny_model
from treadle.models.weights import fuse_experts

TOL = 1e-4
TEXTS = ["The capital of France is Paris, founded 2,000 years ago.", "def f(x):\n    return x * 42  # ok"]


def _tokens_B_T(loaded: LoadedModel) -> torch.Tensor:
    rows = [loaded.tokenizer.encode(t) for t in TEXTS]
    T = min(len(r) for r in rows)
    return torch.tensor([r[:T] for r in rows])


def _max_logit_diff(model_dir: Path, reference_dir: Path | None = None) -> float:
    """Treadle (through `load_model`) vs transformers (from `reference_dir`, default the same dir)."""
    loaded = load_model(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(reference_dir or model_dir), dtype=torch.float32).eval()
    tokens_B_T = _tokens_B_T(loaded)
    with torch.no_grad():
        ours_B_T_V = loaded.model.logits(loaded.model(tokens_B_T))
        theirs_B_T_V = hf(tokens_B_T).logits.float()
    assert ours_B_T_V.shape == theirs_B_T_V.shape
    return (ours_B_T_V - theirs_B_T_V).abs().max().item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_family_matches_transformers(tiny_model_dirs: dict[str, Path], family: str) -> None:
    assert _max_logit_diff(tiny_model_dirs[family]) <= TOL


def test_llama_tied_embeddings_match_transformers(tmp_path: Path) -> None:
    d = write_tiny_model(tmp_path / "tied", "llama", seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(d / "model.safetensors"))
    loaded = load_model(str(d))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert _max_logit_diff(d) <= TOL


def test_moe_per_expert_and_fused_checkpoints_match_transformers(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    per_expert = tiny_model_dirs["qwen3_moe"]
    tensors = load_file(str(per_expert / "model.safetensors"))
    assert any(".experts.0.gate_proj.weight" in k for k in tensors), (
        "transformers wrote a per-expert checkpoint"
    )
    assert _max_logit_diff(per_expert) <= TOL

    fused_dir = tmp_path / "fused"
    shutil.copytree(per_expert, fused_dir)
    fused = fuse_experts(tensors)
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    save_file(fused, str(fused_dir / "model.safetensors"))
    assert _max_logit_diff(fused_dir, reference_dir=per_expert) <= TOL


def test_bfloat16_load_keeps_rope_in_fp32_and_tracks_fp32(tiny_model_dir: Path) -> None:
    fp32 = load_model(str(tiny_model_dir))
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.inv_freq.dtype == torch.float32
    assert not any(p.requires_grad for p in bf16.model.parameters()) and not bf16.model.training
    tokens_B_T = _tokens_B_T(fp32)
    with torch.no_grad():
        a = fp32.model.logprobs(fp32.model(tokens_B_T))
        b = bf16.model.logprobs(bf16.model(tokens_B_T))
    # bf16 keeps ~3 significant digits; a near-uniform tiny model's logprobs are ~ -10.8
    assert (a - b).abs().max().item() < 0.05
