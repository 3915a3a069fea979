"""The seam between the OpenAI-compatible routes and the service: auth, the model list, and model resolution.

The service implements this protocol (`treadle/service/openai_backend.py`); the routes never touch the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from treadle.engine.worker import Worker


class OpenAIBackend(Protocol):
    def authenticate(self, authorization_header: str | None) -> str:
        """Return the owner of the API key in `Authorization: Bearer <key>`; raise `AuthError` otherwise."""
        ...

    def served_models(self, owner: str) -> list[str]:
        """Names `owner` may pass as `model`: the served base models (checkpoints are addressed by path)."""
        ...

    def resolve(self, model: str, owner: str) -> tuple[Worker, str | None]:
        """A base model name → (its engine, None); a `tinker://…/sampler_weights/…` or `…/weights/…` path
        → (the engine of its base model, an adapter id loaded in that engine). Raise `NotFoundError`
        otherwise, also for another owner's checkpoint (so its existence does not leak)."""
        ...
