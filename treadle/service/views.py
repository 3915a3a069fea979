"""JSON views of stored rows in the shapes the SDK's pydantic models validate (protocol §10)."""

from __future__ import annotations

from typing import Any

from treadle.service.paths import CheckpointRef
from treadle.store import CheckpointRow, RunRow

CHECKPOINT_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def checkpoint_json(row: CheckpointRow) -> dict[str, Any]:
    ref = CheckpointRef(row.run_id, row.kind, row.name)
    return {
        "checkpoint_id": ref.checkpoint_id,
        "checkpoint_type": CHECKPOINT_TYPE[row.kind],
        "time": row.created_at.isoformat(),
        "tinker_path": ref.path,
        "size_bytes": row.size_bytes,
        "public": row.public,
        "user_metadata": row.user_metadata or None,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def run_json(run: RunRow, checkpoints_newest_first: list[CheckpointRow]) -> dict[str, Any]:
    last = {
        kind: next((c for c in checkpoints_newest_first if c.kind == kind), None)
        for kind in ("weights", "sampler_weights")
    }
    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.owner,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_config.get("rank"),
        "last_request_time": run.last_request_time.isoformat(),
        "last_checkpoint": checkpoint_json(last["weights"]) if last["weights"] else None,
        "last_sampler_checkpoint": checkpoint_json(last["sampler_weights"])
        if last["sampler_weights"]
        else None,
        # The SDK types user_metadata as dict[str, str]; the cookbook stores renderer_name here.
        "user_metadata": {k: str(v) for k, v in run.user_metadata.items()},
    }
