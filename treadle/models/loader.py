"""`load_model`: one entry point from a user's model name or path to a ready `CausalLM` plus its tokenizer.

Resolution order: the embedded default name → a local directory → a `.gguf` file (converted once into the
treadle cache) → the local Hugging Face hub cache by name, offline (treadle never downloads).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from treadle.errors import NotFoundError, UserError
from treadle.models.causal_lm import CausalLM
from treadle.models.config import ModelConfig
from treadle.models.embedded import DEFAULT_MODEL, embedded_model_dir, treadle_cache_dir
from treadle.models.gguf import convert_gguf
from treadle.models.hub_cache import find_snapshot, repo_folder
from treadle.models.qwen3_vl import build_model
from treadle.models.weights import load_state, read_safetensors

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")


@dataclasses.dataclass
class LoadedModel:
    model: CausalLM  # eval mode, requires_grad False
    config: ModelConfig
    name: str  # as the user named it
    path: Path  # directory holding config.json and the tokenizer files
    tokenizer: Any  # a transformers tokenizer
    max_context_length: int


def _gguf_target(gguf: Path) -> Path:
    # Keyed by the file's identity so an edited or replaced file is converted again.
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return treadle_cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _check_model_dir(d: Path) -> Path:
    if not (d / "config.json").is_file():
        raise UserError(
            f"model path: {d} has no config.json; expected a Hugging Face model directory", field="model"
        )
    if not any(d.glob("*.safetensors")):
        raise UserError(
            f"model path: {d} has no *.safetensors weights (only safetensors checkpoints are supported)",
            field="model",
        )
    return d


def resolve_model_dir(name_or_path: str) -> Path:
    """The directory holding config.json, *.safetensors and tokenizer files, without loading weights."""
    if name_or_path == DEFAULT_MODEL:
        try:
            return embedded_model_dir()
        except NotFoundError:
            # Without the packaged GGUF, a regular download of the same model in the HF cache serves as well.
            snap = find_snapshot(DEFAULT_MODEL)
            if snap is not None and any(snap.glob("*.safetensors")):
                return _check_model_dir(snap)
            raise
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _check_model_dir(p)
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, _gguf_target(p))
    if p.is_file():
        raise UserError(
            f"model path: {p} is a file; pass a model directory, a .gguf file or a model name", field="model"
        )
    searched = [str(p.resolve())]
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        snap = find_snapshot(name_or_path)
        if snap is not None:
            return _check_model_dir(snap)
        searched.append(str(repo_folder(name_or_path)))
    raise NotFoundError(
        f"model {name_or_path!r}: not found; searched {', '.join(searched)}. Pass a local Hugging Face model "
        f"directory, a .gguf file, or a name already in the Hugging Face cache (e.g. `hf download "
        f"{name_or_path}` on a machine with internet); the embedded default {DEFAULT_MODEL!r} always works",
        field="model",
    )


def _check_dtype_device(dtype: str, device: str) -> tuple[torch.dtype, torch.device]:
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not supported; use one of {', '.join(DTYPES)}", field="dtype")
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise UserError(
            f"device: {device!r} is not supported; use one of {', '.join(DEVICES)}", field="device"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device: 'cuda' requested but CUDA is not available on this machine; use 'cpu'", field="device"
        )
    return DTYPES[dtype], torch.device(device)


def load_model(name_or_path: str, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Resolve, build and load a model in eval mode with frozen weights (LoRA adds the trainable part)."""
    from transformers import AutoTokenizer

    torch_dtype, torch_device = _check_dtype_device(dtype, device)
    path = resolve_model_dir(name_or_path)
    config = ModelConfig.from_file(path / "config.json")
    model = build_model(config)
    load_state(model, read_safetensors(path))
    # Only parameters change dtype: RoPE's inverse frequencies stay fp32 for position accuracy.
    for p in model.parameters():
        p.data = p.data.to(torch_dtype)
    model.to(torch_device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(
        model=model,
        config=config,
        name=name_or_path,
        path=path,
        tokenizer=tokenizer,
        max_context_length=config.max_position_embeddings,
    )
