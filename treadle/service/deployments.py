"""Deployments: named, owner-scoped pointers to a sampler checkpoint (or a base model) with a version history.

Create, promote and roll back validate first and change nothing on a refusal. A promotion loads the new adapter
before it becomes live, then switches one in-memory pointer: a request reads the pointer once, when it starts,
and is served entirely by that version (a stream that began before a promotion finishes on its version); the
next request uses the new one. Adapters of earlier versions stay loaded, so nothing in flight loses its weights.
Loading an adapter runs on its worker's scheduler thread (awaited), so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import TYPE_CHECKING, Any

from treadle.errors import ConflictError, NotFoundError, TreadleError, UserError, require
from treadle.service import paths
from treadle.service.openai_backend import ServiceOpenAIBackend
from treadle.service.traces import ServedBy, TraceRecord, Traces
from treadle.store.db import utcnow
from treadle.store.traces import DeploymentRow, TraceStore, VersionRow

if TYPE_CHECKING:
    from treadle.engine.worker import Worker
    from treadle.service.tinker_service import TinkerService

NAME_RE = re.compile(r"[a-zA-Z0-9._-]{1,64}")
MAX_REASON = 2000


@dataclasses.dataclass(frozen=True)
class Live:
    version: int
    model_path: str
    base_model: str


@dataclasses.dataclass(frozen=True)
class DeploymentTarget:
    """What one request is served by, fixed when it starts."""

    served: ServedBy
    engine: Worker
    adapter_id: str | None


class Deployments:
    def __init__(self, service: TinkerService, store: TraceStore, traces: Traces) -> None:
        self._service = service
        self.auth = service.auth
        self._backend = ServiceOpenAIBackend(service)
        self.store = store
        self.traces = traces
        self._live: dict[tuple[str, str], Live] = {}  # (owner, name) → the live version; read per request
        self._loaded: dict[tuple[str, str], tuple[Worker, str | None]] = {}  # (owner, model_path) → adapter
        self._lock = asyncio.Lock()  # one mutation at a time, so versions never race

    # ---- validation
    def check_name(self, name: Any) -> str:
        require(
            isinstance(name, str) and NAME_RE.fullmatch(name) is not None,
            "name",
            f"must match [a-zA-Z0-9._-]{{1,64}}, got {name!r}",
        )
        served = self._service.pool.names()
        require(name not in served, "name", f"{name!r} is a served base model's name; choose another")
        return name

    def _base_model_of(self, owner: str, model_path: Any) -> str:
        """The base model `model_path` runs on; 404 (naming `model_path`) if it is not a checkpoint the
        caller may load or a served base model."""
        require(isinstance(model_path, str) and model_path != "", "model_path", "required (a string)")
        svc = self._service
        if not model_path.startswith(paths.SCHEME):
            if not svc.pool.serves(model_path):
                raise NotFoundError(
                    f"model_path: {model_path!r} is neither a tinker://RUN/sampler_weights/NAME checkpoint nor "
                    f"a served base model ({', '.join(svc.pool.names())})",
                    field="model_path",
                )
            return model_path
        try:
            ref = paths.parse_path(model_path, "model_path")
            svc.weights.check_loadable(owner, ref, optimizer=False)
        except TreadleError as e:
            msg = e.message.removeprefix("path: ").removeprefix("model_path: ")
            raise type(e)(f"model_path: {msg}", field="model_path") from None
        run = svc.store.get_run(ref.run_id)
        if run is None:
            raise NotFoundError(f"model_path: no checkpoint {model_path!r}", field="model_path")
        return run.base_model

    async def _load(self, owner: str, model_path: str) -> tuple[Worker, str | None]:
        """Load the checkpoint's adapter (if not yet loaded), so switching to it costs no request anything.
        Once loaded, a request checks only that it still is (deleting a checkpoint unloads its adapter)."""
        hit = self._loaded.get((owner, model_path))
        if hit is not None and (hit[1] is None or hit[0].has_adapter(hit[1])):
            return hit
        try:
            hit = await self._backend.resolve(model_path, owner)
        except TreadleError as e:
            msg = e.message.removeprefix("model: ")
            raise type(e)(f"model_path: {msg}", field="model_path") from None
        self._loaded[owner, model_path] = hit
        return hit

    @staticmethod
    def _reason(reason: Any) -> str | None:
        require(
            reason is None or (isinstance(reason, str) and len(reason) <= MAX_REASON),
            "reason",
            f"must be a string of at most {MAX_REASON} characters",
        )
        return reason

    # ---- queries
    def _row(self, owner: str, name: str) -> DeploymentRow:
        row = self.store.get_deployment(owner, name) if isinstance(name, str) else None
        if row is None:
            mine = ", ".join(d.name for d in self.store.list_deployments(owner)) or "none"
            raise NotFoundError(
                f"deployment: no deployment {name!r} for this API key; your deployments: {mine}",
                field="deployment",
            )
        return row

    def get(self, owner: str, name: str) -> dict[str, Any]:
        return deployment_json(self._row(owner, name))

    def list_all(self, owner: str) -> dict[str, Any]:
        return {"deployments": [deployment_json(d) for d in self.store.list_deployments(owner)]}

    def names(self, owner: str) -> list[str]:
        return [d.name for d in self.store.list_deployments(owner)]

    # ---- mutations
    async def create(self, owner: str, name: Any, model_path: Any) -> dict[str, Any]:
        name = self.check_name(name)
        base = self._base_model_of(owner, model_path)
        async with self._lock:
            if self.store.get_deployment(owner, name) is not None:
                raise ConflictError(f"name: deployment {name!r} already exists", field="name")
            await self._load(owner, model_path)
            first = VersionRow(1, model_path, utcnow(), "create")
            if not self.store.add_deployment(owner, name, base, first):
                raise ConflictError(f"name: deployment {name!r} already exists", field="name")
            self._live[owner, name] = Live(1, model_path, base)
        return self.get(owner, name)

    async def promote(self, owner: str, name: str, model_path: Any, reason: Any = None) -> dict[str, Any]:
        reason = self._reason(reason)
        async with self._lock:
            row = self._row(owner, name)
            await self._switch(row, model_path, reason or "promote")
        return self.get(owner, name)

    async def rollback(
        self, owner: str, name: str, version: Any = None, reason: Any = None
    ) -> dict[str, Any]:
        reason = self._reason(reason)
        require(
            version is None or (isinstance(version, int) and not isinstance(version, bool)),
            "version",
            f"must be an integer, got {version!r}",
        )
        async with self._lock:
            row = self._row(owner, name)
            target = version if version is not None else row.version - 1
            if version is None and target < 1:
                raise UserError(
                    f"version: deployment {name!r} has no version before the live v{row.version}",
                    field="version",
                )
            found = [v for v in row.history if v.version == target]
            if not found:
                raise NotFoundError(
                    f"version: deployment {name!r} has versions 1..{row.version}, not {target}",
                    field="version",
                )
            if target == row.version:
                raise UserError(f"version: v{target} is already live", field="version")
            note = f"rollback to v{target}" + (f": {reason}" if reason else "")
            await self._switch(row, found[0].model_path, note)
        return self.get(owner, name)

    async def _switch(self, row: DeploymentRow, model_path: Any, reason: str) -> None:
        """Validate and load `model_path`, then record the new version and make it live (caller holds the lock)."""
        base = self._base_model_of(row.owner, model_path)
        if base != row.base_model:
            raise UserError(
                f"model_path: {model_path!r} is for base model {base!r}; deployment {row.name!r} serves "
                f"{row.base_model!r}",
                field="model_path",
            )
        await self._load(row.owner, model_path)
        version = max(v.version for v in row.history) + 1
        self.store.add_version(row.owner, row.name, VersionRow(version, model_path, utcnow(), reason))
        self._live[row.owner, row.name] = Live(version, model_path, base)

    # ---- serving
    def live(self, owner: str, name: str) -> Live | None:
        live = self._live.get((owner, name))
        if live is None:  # first request after a restart: read it once from the store
            row = self.store.get_deployment(owner, name)
            if row is None:
                return None
            live = self._live[owner, name] = Live(row.version, row.live.model_path, row.base_model)
        return live

    async def lookup(self, model: str, owner: str) -> DeploymentTarget | None:
        """The version serving `model` for `owner` if it names one of their deployments, else None."""
        if not NAME_RE.fullmatch(model):
            return None
        live = self.live(owner, model)
        if live is None:
            return None
        engine, adapter_id = await self._load(owner, live.model_path)
        return DeploymentTarget(
            ServedBy(owner, model, live.version, live.model_path, live.base_model), engine, adapter_id
        )

    async def record(self, target: DeploymentTarget, records: list[TraceRecord]) -> None:
        """Store the traces of one response before it completes (so feedback can follow at once), off the loop."""
        if self.traces.capture and records:
            await asyncio.to_thread(self.traces.record, target.served, records)


def deployment_json(d: DeploymentRow) -> dict[str, Any]:
    return {
        "name": d.name,
        "base_model": d.base_model,
        "version": d.version,
        "model_path": d.live.model_path,
        "created_at": d.created_at.isoformat(),
        "updated_at": d.updated_at.isoformat(),
        "history": [
            {
                "version": v.version,
                "model_path": v.model_path,
                "created_at": v.created_at.isoformat(),
                "reason": v.reason,
            }
            for v in d.history
        ],
    }
