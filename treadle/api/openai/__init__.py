"""OpenAI-compatible inference: /v1/models, /v1/completions, /v1/chat/completions over the shared sampler."""

from treadle.api.openai.backend import OpenAIBackend
from treadle.api.openai.routes import make_router

__all__ = ["OpenAIBackend", "make_router"]
