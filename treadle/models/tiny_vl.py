"""Tiny random-init Qwen3-VL checkpoints (dense and MoE), written by transformers, with a local tokenizer (SmolLM2's
plus the Qwen vision tokens) and a hand-built image-processor config, so vision tests need no download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from treadle.errors import UserError
from treadle.models.embedded import embedded_tokenizer_dir

TINY_VL_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen3-VL's chat template, reduced to what treadle renders: ChatML turns whose content is a string or a list of
# text / image parts (each image becomes <|vision_start|><|image_pad|><|vision_end|>, as the real template does).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The image processor Qwen3-VL ships (Qwen2VLImageProcessor: patch 16, merge 2, mean/std 0.5), with a small pixel
# budget so test images become a handful of tokens: 32×32 px (1 token) up to 128×128 px (16 tokens).
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "resample": 3,
    "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
}


_WRITTEN: dict[str, tuple[Path, list[str], int]] = {}  # the tokenizer is built once per process, then copied


def _write_tokenizer(out: Path) -> int:
    """SmolLM2's tokenizer with the Qwen vision tokens added as special tokens; returns the new vocabulary size."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    done = _WRITTEN.get("tokenizer")
    if done is not None and all((done[0] / f).is_file() for f in done[1]):
        for f in done[1]:
            shutil.copy2(done[0] / f, out / f)
        return done[2]
    before = {p.name for p in out.iterdir()}
    tok: Any = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS], special_tokens=True
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    _WRITTEN["tokenizer"] = (out, sorted({p.name for p in out.iterdir()} - before), len(tok))
    return len(tok)


def tiny_vl_config_dict(family: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for the family's HF config: 2 text layers (GQA, qk-norm, interleaved MRoPE, MoE for
    qwen3_vl_moe) and a 2-block vision tower with a deepstack merger on each block."""
    if family not in TINY_VL_FAMILIES:
        raise UserError(
            f"family: {family!r} is not supported; use one of {', '.join(TINY_VL_FAMILIES)}", field="family"
        )
    ids = {t: 49152 + i for i, t in enumerate(VISION_TOKENS)}  # appended after SmolLM2's 49152 tokens
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "qwen3_vl_moe":
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    vision: dict[str, Any] = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    base: dict[str, Any] = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def write_tiny_vl_model(
    directory: str | Path, family: str = "qwen3_vl", *, seed: int = 0, **overrides: Any
) -> Path:
    """Write config.json + model.safetensors (random init from `seed`) + tokenizer + preprocessor_config.json."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(out)
    kwargs = tiny_vl_config_dict(family, vocab + (-vocab) % 8, **overrides)
    hf_config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(hf_config, dtype=torch.float32)
    # transformers initialises the vision tower's position table and mergers near zero; give every weight a
    # visible scale so a parity test exercises them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name and p.dim() >= 1 and "norm" not in name:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    gen = out / "generation_config.json"
    if not gen.exists():
        gen.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out
