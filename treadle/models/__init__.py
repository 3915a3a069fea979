"""treadle.models: model families in plain PyTorch and their weight loaders."""

from treadle.models.causal_lm import CausalLM, LoraTarget, causal_mask
from treadle.models.config import FAMILIES, ModelConfig
from treadle.models.embedded import DEFAULT_MODEL
from treadle.models.hooks import KVCacheHook, LoraHook
from treadle.models.loader import LoadedModel, load_model, resolve_model_dir

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "CausalLM",
    "KVCacheHook",
    "LoadedModel",
    "LoraHook",
    "LoraTarget",
    "ModelConfig",
    "causal_mask",
    "load_model",
    "resolve_model_dir",
]
