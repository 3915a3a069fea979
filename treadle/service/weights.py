"""Moving a training run's weights to and from checkpoints: save_weights (weights/ and sampler_weights/),
save_weights_external (optionally encrypted) and the two ways of loading one back."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

from treadle.atomic import publish_dir
from treadle.engine.worker import Worker
from treadle.errors import ConflictError, NotFoundError
from treadle.service import paths
from treadle.service.export import encrypt_dir
from treadle.service.paths import CheckpointRef
from treadle.service.results import ExternalWeightsSaved, WeightsLoaded, WeightsSaved
from treadle.service.state import LoadedModel, ServiceState


class Weights:
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    def save_weights(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        *,
        kind: str,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, Any],
    ) -> str:
        s = self.s
        ref = CheckpointRef(model_id, kind, paths.check_name(name))
        expires = s.expiry(ttl_seconds)

        def call(m: LoadedModel) -> WeightsSaved:
            if not overwrite and s.store.get_checkpoint(ref.run_id, ref.kind, ref.name) is not None:
                raise ConflictError(
                    f"path: checkpoint {ref.path!r} already exists; pass overwrite=True", field="path"
                )
            m.worker.save_adapter(
                model_id, s.blobs.path(ref.run_id, kind, ref.name), optimizer=kind == "weights"
            )
            s.record_checkpoint(owner, ref, expires, user_metadata)
            self._forget_loaded_checkpoint(m.worker, ref)
            return WeightsSaved(ref.path, kind)

        return s.ordered(owner, model_id, seq_id, "save_weights", call)

    def _forget_loaded_checkpoint(self, worker: Worker, ref: CheckpointRef) -> None:
        """An overwritten checkpoint must not keep serving its old weights from the engine (worker thread)."""
        stale = f"ckpt:{ref.path}"
        if worker.has_adapter(stale):
            worker.remove_adapter(stale)
            self.s.forget_samplers_of(stale)

    def save_weights_external(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        ttl_seconds: int | None,
        recipients: list[str] | None,
    ) -> str:
        s = self.s
        ref = CheckpointRef(model_id, "external_weights", paths.check_name(name))
        expires = s.expiry(ttl_seconds)

        def call(m: LoadedModel) -> ExternalWeightsSaved:
            final = s.blobs.path(ref.run_id, ref.kind, ref.name)
            tmp = final.with_name(f".{ref.name}.tmp-{uuid.uuid4().hex[:8]}")
            plain = tmp.with_name(tmp.name + "-plain")
            try:
                m.worker.save_adapter(model_id, plain, optimizer=False)
                if recipients:
                    encrypt_dir(plain, tmp, recipients)
                else:
                    plain.rename(tmp)
                publish_dir(tmp, final)
            finally:
                shutil.rmtree(plain, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
            s.record_checkpoint(owner, ref, expires, {})
            return ExternalWeightsSaved(ref.path, s.blobs.size(ref.run_id, ref.kind, ref.name))

        return s.ordered(owner, model_id, seq_id, "save_weights_external", call)

    def load_weights_new(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        path: str,
        optimizer: bool,
        user_metadata: dict[str, Any] | None,
    ) -> tuple[str, str]:
        """Create-via-load (protocol §5.6): a new model `{session}:train:{seq}` from a checkpoint."""
        s = self.s
        s.admit_run(owner)
        s.active_session(owner, session_id)
        ref = paths.parse_path(path)
        s.check_loadable(owner, ref, optimizer)
        src = s.store.get_run(ref.run_id)
        if src is None:
            raise NotFoundError(f"path: the training run of {path!r} no longer exists", field="path")
        worker = s.pool.place(src.base_model, "path")
        mid = paths.model_id(session_id, model_seq_id)
        directory = s.blobs.path(ref.run_id, ref.kind, ref.name)
        meta = user_metadata if user_metadata is not None else src.user_metadata

        def call() -> WeightsLoaded:
            if s.store.get_run(mid) is not None:
                raise ConflictError(f"model_seq_id: model {mid!r} already exists", field="model_seq_id")
            lora = worker.load_adapter(mid, directory, optimizer=optimizer)
            s.register_model(owner, session_id, mid, worker, lora, meta)
            return WeightsLoaded(path, mid)

        rid = s.submit(
            owner,
            "load_weights",
            f"create:{mid}",
            lambda r: worker.submit_call(mid, None, call, s.done(r)),
        )
        return rid, mid

    def check_loadable(self, owner: str, ref: CheckpointRef, optimizer: bool) -> None:
        self.s.check_loadable(owner, ref, optimizer)

    def load_weights_into(self, owner: str, model_id: str, seq_id: int, path: str, optimizer: bool) -> str:
        """Legacy `TrainingClient.load_state`: replace an existing model's weights, in seq_id order."""
        ref = paths.parse_path(path)
        self.s.check_loadable(owner, ref, optimizer)
        directory = self.s.blobs.path(ref.run_id, ref.kind, ref.name)

        def call(m: LoadedModel) -> WeightsLoaded:
            engine = m.worker
            engine.remove_adapter(model_id)
            engine.load_adapter(model_id, directory, optimizer=optimizer)
            return WeightsLoaded(path, model_id)

        return self.s.ordered(owner, model_id, seq_id, "load_weights", call)
