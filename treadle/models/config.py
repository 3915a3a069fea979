"""ModelConfig: one typed description of every supported family, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from treadle.errors import UserError

FAMILIES = ("llama", "qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe")
VISION_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")


@dataclasses.dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    # mixture of experts (qwen3_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # vision-language (qwen3_vl*): interleaved multimodal RoPE sections (t, h, w) and the HF vision_config plus
    # the image token ids; None for text-only models
    mrope_section: tuple[int, ...] = ()
    vision: dict[str, Any] | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        family = d.get("model_type", "")
        if family in VISION_FAMILIES:
            return cls._from_vl_dict(d)
        if family not in FAMILIES:
            raise UserError(
                f"model config: model_type {family!r} is not supported; supported families: {', '.join(FAMILIES)}",
                field="model_type",
            )
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or None
        theta = d.get("rope_theta")
        if theta is None and isinstance(rope, dict):
            theta = rope.get("rope_theta")
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0),
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0),
            rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            num_experts=(d.get("num_experts") or d.get("num_local_experts") or 0)
            if family == "qwen3_moe"
            else 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 0),
            moe_intermediate_size=d.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(d.get("mlp_only_layers", []) or []),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
        )

    @classmethod
    def _from_vl_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Qwen3-VL: the text stack is Qwen3 (dense) or Qwen3-MoE under `text_config`; MRoPE and the vision tower
        are described beside it."""
        family = d["model_type"]
        text = dict(d.get("text_config") or {})
        text["model_type"] = "qwen3_moe" if family == "qwen3_vl_moe" else "qwen3"
        text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        cfg = cls.from_hf_dict(text)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        vision = dict(d.get("vision_config") or {})
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            vision[k] = d.get(k)
        return dataclasses.replace(
            cfg,
            family=family,
            rope_scaling=None,
            mrope_section=tuple(rope.get("mrope_section") or (24, 20, 20)),
            vision=vision,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))
