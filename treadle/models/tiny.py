"""Tiny random-init Hugging Face checkpoints (built and saved by transformers) with the real SmolLM2 tokenizer,
for tests that need a genuine model directory in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from treadle.errors import UserError
from treadle.models.embedded import embedded_tokenizer_dir

TINY_FAMILIES = ("llama", "qwen3", "qwen3_moe")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def tiny_config_dict(family: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for the family's HF config class: small, but every code path (GQA, qk-norm, MoE) on."""
    if family not in TINY_FAMILIES:
        raise UserError(
            f"family: {family!r} is not supported; use one of {', '.join(TINY_FAMILIES)}", field="family"
        )
    base: dict[str, Any] = dict(
        vocab_size=49152,  # the SmolLM2 tokenizer's
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family in ("qwen3", "qwen3_moe"):
        base["head_dim"] = 16
    if family == "qwen3_moe":
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    base.update(overrides)
    return base


def write_tiny_model(
    directory: str | Path, family: str = "llama", *, seed: int = 0, **config_overrides: Any
) -> Path:
    """Write config.json + model.safetensors (random init from `seed`) + the SmolLM2 tokenizer into `directory`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = tiny_config_dict(family, **config_overrides)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(str(out))
    tok_dir = embedded_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file() and not (name == "generation_config.json" and (out / name).exists()):
            shutil.copy2(tok_dir / name, out / name)
    return out
