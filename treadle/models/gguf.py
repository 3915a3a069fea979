"""GGUF → Hugging Face directory: dequantized fp32 safetensors, `config.json` and tokenizer files.

transformers' GGUF integration does the hard part (tensor renaming, undoing llama.cpp's q/k permutation,
dequantization); its tokenizer path picks the wrong class for byte-level BPE files in transformers 5
(CodeLlama, with FIM tokens added and eos = bos), so byte-level tokenizers are rebuilt here from the GGUF
vocabulary with the `tokenizers` library, the way the original `tokenizer.json` is laid out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from treadle.atomic import build_once
from treadle.errors import UserError
from treadle.models.config import ModelConfig

CONVERTER_VERSION = 1  # bump when the written layout changes, so stale cached conversions are not reused
_TOKEN_TYPE_CONTROL = 3  # llama.cpp token types: 1 normal, 3 control (special), 4 user-defined


def log(msg: str) -> None:
    """Progress for long one-time work goes to stderr so it never mixes with program output."""
    print(f"treadle: {msg}", file=sys.stderr, flush=True)


def _reader(gguf_path: Path) -> Any:
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise UserError(f"model path: GGUF file {gguf_path} does not exist", field="model")
    try:
        return GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises bare ValueErrors on malformed files
        raise UserError(f"model path: {gguf_path} is not a readable GGUF file ({e})", field="model") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_config(gguf_path: Path) -> dict[str, Any]:
    """The HF `config.json` dict for a GGUF file (metadata only; no tensor is read)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    except ValueError as e:
        raise UserError(f"model path: {gguf_path}: {e}", field="model") from e
    # GGUF stores floats as float32: print them back at float32 precision (9.99999974e-06 → 1e-05).
    raw: dict[str, Any] = {
        k: float(f"{v:.7g}") if isinstance(v, float) else v
        for k, v in parsed["config"].items()
        if not k.startswith("_")
    }
    model_type = str(raw.pop("model_type"))
    cfg = AutoConfig.for_model(model_type, **raw)
    d = {k: v for k, v in cfg.to_dict().items() if k not in _GENERIC_CONFIG_KEYS}
    d["architectures"] = [_ARCH.get(model_type, "AutoModelForCausalLM")]
    d["torch_dtype"] = "float32"
    return d


# PretrainedConfig bookkeeping that says nothing about the model; a hub config.json does not carry it either.
_GENERIC_CONFIG_KEYS = {
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "problem_type",
    "_name_or_path",
    "dtype",
}
_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def read_gguf_tensors(gguf_path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its HF name (llama.cpp's q/k permutation undone)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers maps GGUF names to HF names through a model's state_dict; a meta model costs nothing.
    hf_cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        dummy = AutoModelForCausalLM.from_config(hf_cfg)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=dummy)
    return {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}


def _bytelevel_tokenizer(reader: Any) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    merges: list[str] = list(_field(reader, "tokenizer.ggml.merges", []))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    bpe = BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[(a, b) for a, b in (m.split(" ", 1) for m in merges)],
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    # llama.cpp's "smollm" pre-tokenizer splits every digit before the GPT-2 regex, like the original file.
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == _TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def write_gguf_tokenizer(gguf_path: Path, directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    reader = _reader(gguf_path)  # opening parses every vocabulary entry (seconds): open once, pass it on
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        _write_tokenizer_via_transformers(gguf_path, directory)
        return
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    tok = _bytelevel_tokenizer(reader)
    tok.save(str(directory / "tokenizer.json"))

    def tok_at(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None else None

    specials = {
        "bos_token": tok_at("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_at("tokenizer.ggml.eos_token_id"),
        "pad_token": tok_at("tokenizer.ggml.padding_token_id"),
        "unk_token": tok_at("tokenizer.ggml.unknown_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    # The chat-role markers are what a chat template emits; listing them keeps decode(skip_special_tokens) clean.
    extra = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokens]
    if extra:
        specials["additional_special_tokens"] = extra  # type: ignore[assignment]
    context = _field(reader, f"{_field(reader, 'general.architecture')}.context_length")
    cfg: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context) if context else 8192,
        "vocab_size": len(tokens),
        **specials,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    _write_json(directory / "tokenizer_config.json", cfg)
    _write_json(directory / "special_tokens_map.json", specials)


def _write_tokenizer_via_transformers(gguf_path: Path, directory: Path) -> None:
    # SentencePiece-style GGUF vocabularies: transformers' converter handles these correctly.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(directory))


def write_generation_config(config: dict[str, Any], directory: Path) -> None:
    gen = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
    }
    _write_json(directory / "generation_config.json", gen)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_hf_directory(gguf_path: Path, directory: Path, *, weights: bool = True) -> None:
    """Fill `directory` (which exists) with the HF form of `gguf_path`; `weights=False` skips dequantization."""
    from safetensors.torch import save_file

    config = read_gguf_config(gguf_path)
    ModelConfig.from_hf_dict(config)  # an unsupported family fails here, before minutes of dequantization
    _write_json(directory / "config.json", config)
    write_generation_config(config, directory)
    write_gguf_tokenizer(gguf_path, directory)
    if weights:
        t0 = time.monotonic()
        tensors = read_gguf_tensors(gguf_path, config)
        # transformers refuses save_pretrained on a GGUF-loaded model; safetensors directly is also faster.
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        log(f"dequantized {len(tensors)} tensors in {time.monotonic() - t0:.0f} s")


def build_directory_atomically(target: Path, fill: Callable[[Path], None], *, what: str) -> Path:
    """Create `target` once, across processes (concurrent first uses convert once instead of racing on the
    same CPU): filled in a temporary sibling, fsynced, renamed; a crash never leaves it half-written."""
    t0 = time.monotonic()

    def logged_fill(tmp: Path) -> None:
        log(f"preparing {what} (one time) → {target}")
        fill(tmp)

    if build_once(target, logged_fill):
        log(f"{what} ready in {time.monotonic() - t0:.0f} s")
    return target


def convert_gguf(gguf_path: Path, target: Path, *, weights: bool = True) -> Path:
    """`target` holding the HF form of `gguf_path`, converting on first use and reusing it afterwards."""
    return build_directory_atomically(
        target, lambda d: write_hf_directory(gguf_path, d, weights=weights), what=f"{gguf_path.name}"
    )
