"""The seam between the OpenAI-compatible routes and the service: auth, the model list, model resolution, and
the little the routes need from a resolved model (`ServedModel`).

The service implements `OpenAIBackend` (`treadle/service/openai_backend.py`); the routes never touch the store,
and they see a model only as a `ServedModel` (tokenizer, info, images, sample), never as an engine or a worker.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback
    from treadle.engine.types import SampleRequest, SampleResult
    from treadle.engine.vision_input import ImageExpander


class ServedModel(Protocol):
    """A base model as the routes use it: render and decode text, expand images, sample.

    Sampling goes to the model's shared continuous-batching sampler; `sample` returns at once with a future
    (cancel it to stop generation) and reports each token to `on_token` as it is drawn."""

    @property
    def info(self) -> EngineInfo:
        """vocab_size, eos_token_ids, max_context_length of the model."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (chat template, encode, decode), in this process."""
        ...

    @property
    def images(self) -> ImageExpander:
        """Expands image placeholders into the model's image tokens (refuses images on a text-only model)."""
        ...

    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]: ...


class OpenAIBackend(Protocol):
    def authenticate(self, authorization_header: str | None) -> str:
        """Return the owner of the API key in `Authorization: Bearer <key>`; raise `AuthError` otherwise."""
        ...

    def served_models(self, owner: str) -> list[str]:
        """Names `owner` may pass as `model`: the served base models (checkpoints are addressed by path)."""
        ...

    async def resolve(self, model: str, owner: str) -> tuple[ServedModel, str | None]:
        """A base model name → (the model, None); a `tinker://…/sampler_weights/…` or `…/weights/…` path
        → (its base model, the id of the checkpoint's adapter, loaded there without blocking the event loop).
        Raise `NotFoundError` otherwise, also for another owner's checkpoint (so its existence does not leak)."""
        ...
