"""treadle.models: model families in plain PyTorch and their weight loaders."""

from treadle.models.causal_lm import CausalLM, LoraTarget, causal_mask
from treadle.models.config import FAMILIES, ModelConfig
from treadle.models.hooks import KVCacheHook, LoraHook

__all__ = ["FAMILIES", "CausalLM", "KVCacheHook", "LoraHook", "LoraTarget", "ModelConfig", "causal_mask"]
