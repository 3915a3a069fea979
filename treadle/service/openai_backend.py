"""The service side of the OpenAI API (`treadle.api.openai.backend.OpenAIBackend`): the same keys, owners,
served models and checkpoints as the Tinker API, so a trained adapter is addressable by its tinker:// path.
A resolved model is a `Worker`, which the routes see only through the `ServedModel` protocol."""

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

    async def resolve(self, model: str, owner: str) -> tuple[Worker, str | None]:
        """A served base model → (a replica of it, None); a checkpoint path the owner may load → (a replica of its
        base model, the checkpoint's adapter id), loading the adapter on that replica's scheduler thread (once,
        shared with Tinker samplers of the same path) while the event loop keeps serving."""
        svc = self._service
        if not model.startswith(paths.SCHEME):
            if not svc.pool.serves(model):
                raise NotFoundError(
                    f"model: {model!r} is not served here; served models: {', '.join(svc.pool.names())}",
                    field="model",
                )
            return svc.pool.any_replica(model), None
        try:
            ref = paths.parse_path(model, "model")
            svc.weights.check_loadable(owner, ref, optimizer=False)
            run = svc.store.get_run(ref.run_id)
            if run is None:
                raise NotFoundError(f"model: no checkpoint {model!r}", field="model")
            worker = svc.pool.any_replica(run.base_model, "model")
        except NotFoundError:
            raise
        except TreadleError as e:
            raise NotFoundError(f"model: {e.message}", field="model") from e
        return worker, await svc.sampling.checkpoint_adapter(worker, ref)
