"""The service side of the OpenAI API (`treadle.api.openai.backend.OpenAIBackend`): the same keys, owners,
served models and checkpoints as the Tinker API, so a trained adapter is addressable by its tinker:// path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from treadle.errors import AuthError, NotFoundError, TreadleError
from treadle.service import paths
from treadle.service.tinker_service import TinkerService

if TYPE_CHECKING:
    from treadle.engine.worker import Worker


class ServiceOpenAIBackend:
    def __init__(self, service: TinkerService) -> None:
        self._service = service

    def authenticate(self, authorization_header: str | None) -> str:
        if not authorization_header:
            raise AuthError(
                "Authorization: missing; send 'Authorization: Bearer <API key>'", field="Authorization"
            )
        scheme, _, key = authorization_header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("Authorization: must be 'Bearer <API key>'", field="Authorization")
        return self._service.auth.owner(key.strip())

    def served_models(self, owner: str) -> list[str]:
        return self._service.pool.names()

    async def hold_sampling_tokens(self, owner: str, tokens: int) -> Callable[[], None]:
        """Hold `tokens` in the server's sampling budget (shared with Tinker `asample`), waiting up to
        `--queue-wait-s` for room, else a 429 naming the limit; returns the release."""
        return await self._service.admission.wait_for_tokens(owner, tokens)

    def resolve(self, model: str, owner: str) -> tuple[Worker, str | None]:
        svc = self._service
        if not model.startswith(paths.SCHEME):
            worker = svc.pool.any_replica(model) if svc.pool.serves(model) else None
            if worker is None:
                raise NotFoundError(
                    f"model: {model!r} is not served here; served models: {', '.join(svc.pool.names())}",
                    field="model",
                )
            return worker, None
        try:
            ref = paths.parse_path(model, "model")
            svc.check_loadable(owner, ref, optimizer=False)
            run = svc.store.get_run(ref.run_id)
            if run is None:
                raise NotFoundError(f"model: no checkpoint {model!r}", field="model")
            worker = svc.pool.any_replica(run.base_model, "model")
        except NotFoundError:
            raise
        except TreadleError as e:
            raise NotFoundError(f"model: {e.message}", field="model") from e
        adapter_id = f"ckpt:{ref.path}"
        if not worker.has_adapter(adapter_id):
            worker.load_adapter(adapter_id, svc.blobs.path(ref.run_id, ref.kind, ref.name), optimizer=False)
        return worker, adapter_id
