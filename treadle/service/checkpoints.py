"""The REST side of runs and checkpoints: listing and describing them, publishing, TTLs and deletion,
copying weights between owners, and signed download URLs for external weights."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from treadle.atomic import atomic_write_dir
from treadle.errors import NotFoundError, UserError
from treadle.service import paths, views
from treadle.service.paging import check_page
from treadle.service.paths import CheckpointRef
from treadle.service.state import ServiceState
from treadle.store import RunRow, utcnow


class Checkpoints:
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    def capabilities(self) -> list[dict[str, Any]]:
        """Each served model's true limits: the SDK's SupportedModel fields plus the largest LoRA rank the
        adapter bank takes and whether the model reads ImageChunks (extra fields the SDK keeps or ignores)."""
        return [
            {
                "model_name": w.name,
                "max_context_length": w.info.max_context_length,
                "trainable": True,
                "sampleable": True,
                "max_lora_rank": w.info.max_lora_rank,
                "supports_images": w.info.supports_images,
            }
            for w in (self.s.pool.get(name) for name in self.s.pool.names())
        ]

    def _run_json(self, run: RunRow) -> dict[str, Any]:
        cks, _ = self.s.store.list_checkpoints(run_id=run.run_id)
        return views.run_json(run, cks)

    def get_run(self, owner: str, run_id: str) -> dict[str, Any]:
        return self._run_json(self.s.run(owner, run_id, "training_run_id"))

    def list_runs(self, owner: str, limit: int, offset: int) -> dict[str, Any]:
        check_page(limit, offset)
        runs, total = self.s.store.list_runs(owner, limit, offset)
        return {
            "training_runs": [self._run_json(r) for r in runs],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    def list_checkpoints(
        self, owner: str, run_id: str | None, limit: int = 1000, offset: int = 0
    ) -> dict[str, Any]:
        check_page(limit, offset)
        if run_id is not None:
            self.s.run(owner, run_id, "training_run_id")
        now = utcnow()
        rows, total = self.s.store.list_checkpoints(run_id=run_id, owner=owner, limit=limit, offset=offset)
        live = [r for r in rows if r.expires_at is None or r.expires_at >= now]
        return {
            "checkpoints": [views.checkpoint_json(r) for r in live],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    def get_checkpoint(self, owner: str, ref: CheckpointRef) -> dict[str, Any]:
        return views.checkpoint_json(self.s.checkpoint(owner, ref))

    def delete_checkpoint(self, owner: str, ref: CheckpointRef) -> None:
        self.s.checkpoint(owner, ref, write=True)
        self._delete_checkpoint(ref)

    def _delete_checkpoint(self, ref: CheckpointRef) -> None:
        s = self.s
        s.store.delete_checkpoint(ref.run_id, ref.kind, ref.name)
        s.blobs.delete(ref.run_id, ref.kind, ref.name)
        adapter_id = f"ckpt:{ref.path}"
        for w in s.pool.all():
            if w.has_adapter(adapter_id):
                s.forget_samplers_of(adapter_id)
                s.drop_adapters(w, [adapter_id])

    def set_public(self, owner: str, ref: CheckpointRef, public: bool) -> None:
        self.s.checkpoint(owner, ref, write=True)
        self.s.store.update_checkpoint(ref.run_id, ref.kind, ref.name, public=public)

    def set_ttl(self, owner: str, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        self.s.checkpoint(owner, ref, write=True)
        self.s.store.update_checkpoint(ref.run_id, ref.kind, ref.name, expires_at=self.s.expiry(ttl_seconds))

    def sweep_expired_checkpoints(self) -> int:
        expired = self.s.store.expired_checkpoints(utcnow())
        for row in expired:
            self._delete_checkpoint(CheckpointRef(row.run_id, row.kind, row.name))
        return len(expired)

    def weights_info(self, owner: str, path: str) -> dict[str, Any]:
        ref = paths.parse_path(path, "tinker_path")
        self.s.checkpoint(owner, ref)
        run = self.s.store.get_run(ref.run_id)
        if run is None:
            raise NotFoundError(
                f"tinker_path: the training run of {path!r} no longer exists", field="tinker_path"
            )
        lc = run.lora_config
        return {
            "base_model": run.base_model,
            "is_lora": True,
            "lora_rank": lc.get("rank"),
            "train_unembed": lc.get("train_unembed"),
            "train_mlp": lc.get("train_mlp"),
            "train_attn": lc.get("train_attn"),
        }

    def copy_weights(self, owner: str, source_path: str, ttl_seconds: int | None) -> str:
        """Copy a readable checkpoint (e.g. a published one) into a new run the caller owns; the copy keeps its
        kind and name and its run cannot be trained on (no session, never loaded)."""
        s = self.s
        src = paths.parse_path(source_path, "source_path")
        s.checkpoint(owner, src)
        src_run = s.store.get_run(src.run_id)
        if src_run is None:
            raise NotFoundError(
                f"source_path: the training run of {source_path!r} no longer exists", field="source_path"
            )
        expires = s.expiry(ttl_seconds)
        now = utcnow()
        dst = CheckpointRef(f"copy-{uuid.uuid4().hex[:16]}", src.kind, src.name)
        s.store.add_run(
            RunRow(
                dst.run_id,
                "",
                owner,
                src_run.base_model,
                src_run.lora_config,
                src_run.user_metadata,
                now,
                now,
            )
        )
        target = s.blobs.path(dst.run_id, dst.kind, dst.name)
        with atomic_write_dir(target) as tmp:
            shutil.copytree(s.blobs.path(src.run_id, src.kind, src.name), tmp, dirs_exist_ok=True)
        s.record_checkpoint(owner, dst, expires, {})
        return dst.path

    def external_urls(
        self, owner: str, ref: CheckpointRef, expires_in_s: int = 3600
    ) -> tuple[dict[str, str], int]:
        """Relative file path → signed `blobs/...` path (the API prefixes the base URL); and the expiry."""
        if ref.kind != "external_weights":
            raise UserError(
                "checkpoint_id: only external_weights/ checkpoints have download URLs", field="checkpoint_id"
            )
        self.s.checkpoint(owner, ref)
        root = self.s.blobs.path(ref.run_id, ref.kind, ref.name)
        expires = int(time.time()) + expires_in_s
        urls: dict[str, str] = {}
        for f in sorted(root.rglob("*")):
            if f.is_file():
                rel = f"{ref.run_id}/{ref.kind}/{ref.name}/{f.relative_to(root)}"
                urls[str(f.relative_to(root))] = f"blobs/{self.s.signer.sign(rel, expires)}/{rel}"
        return urls, expires

    def blob_file(self, token: str, rel: str) -> Path:
        parts = rel.split("/")
        if len(parts) < 4 or ".." in parts or not self.s.signer.verify(rel, token, time.time()):
            raise NotFoundError("url: this download link is invalid or has expired", field="url")
        path = self.s.blobs.root.joinpath(*parts)
        if not path.is_file():
            raise NotFoundError("url: this file no longer exists", field="url")
        return path
