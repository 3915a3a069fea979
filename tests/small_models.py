"""Small random-init Hugging Face checkpoints (vocab 128, no tokenizer) for tests of engine logic.

Written with transformers, so they are genuine checkpoints that go through treadle's real weight loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from treadle.models import CausalLM, ModelConfig
from treadle.models.weights import load_state, read_safetensors

SMALL: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def write_small_checkpoint(directory: Path, family: str = "llama", **overrides: Any) -> Path:
    """A seeded random checkpoint in `directory/family`; `overrides` change the config (e.g. MoE sizes)."""
    torch.manual_seed(0)
    kw = SMALL | overrides
    if family == "llama":
        hf: transformers.PreTrainedModel = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif family == "qwen3_moe":
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    else:
        raise ValueError(f"family: {family!r} is not one of llama, qwen3_moe")
    d = directory / family
    hf.save_pretrained(d)
    return d


def load_small(directory: Path) -> CausalLM:
    """The checkpoint in treadle, frozen and in eval mode (as the engine loads base models)."""
    m = CausalLM(ModelConfig.from_file(directory / "config.json"))
    load_state(m, read_safetensors(directory))
    return m.eval().requires_grad_(False)
