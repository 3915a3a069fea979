"""Tiny random-init Hugging Face checkpoints (built and saved by transformers) with the real SmolLM2 tokenizer,
for tests that need a genuine model directory in seconds.
"""

from __future__ import annotations

import json
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


# HF parameter name (within a layer) → llama.cpp tensor name, for the tiny GGUF writer.
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w_O_I: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute: llama.cpp's RoPE pairs adjacent dims, HF's pairs the two halves.
    return (
        w_O_I.reshape(n_head, 2, w_O_I.shape[0] // n_head // 2, w_O_I.shape[1])
        .swapaxes(1, 2)
        .reshape(w_O_I.shape)
    )


def write_tiny_gguf(model_dir: str | Path, gguf_path: str | Path) -> Path:
    """Write a tiny llama HF directory (from `write_tiny_model`) as an F32 GGUF file, the way llama.cpp's
    converter does (q/k permuted, byte-level BPE vocabulary), so the GGUF loader can be checked end to end."""
    import gguf
    from safetensors.torch import load_file

    src = Path(model_dir)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise UserError(
            f"model_type: {cfg.get('model_type')!r}; the tiny GGUF writer supports 'llama'", field="model"
        )
    tok_json = json.loads((src / "tokenizer.json").read_text())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok_json["added_tokens"] if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(gguf_path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    w.add_unk_token_id(vocab[tok_cfg["unk_token"]])
    w.add_add_bos_token(False)
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])

    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers.") :].split(".", 1)
            if rest == "self_attn.q_proj.weight":
                t = _llama_cpp_permute(t, heads)
            elif rest == "self_attn.k_proj.weight":
                t = _llama_cpp_permute(t, kv_heads)
            out = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
        else:
            out = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
            }.get(name, "output.weight" if name == "lm_head.weight" else name)
        w.add_tensor(out, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(gguf_path)
