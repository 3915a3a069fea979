"""Identifiers the SDK assumes (protocol §3): model ids, sampler ids and `tinker://` checkpoint paths."""

from __future__ import annotations

import dataclasses

from treadle.errors import UserError
from treadle.store import KINDS, check_name

SCHEME = "tinker://"


def model_id(session_id: str, model_seq_id: int) -> str:
    # Mandatory shape: in create-via-load the SDK computes this id itself (protocol §3).
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, sampling_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_seq_id}"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    run_id: str
    kind: str  # weights | sampler_weights | external_weights
    name: str

    @property
    def path(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


def parse_path(path: str, field: str = "path") -> CheckpointRef:
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise UserError(f"{field}: must be a tinker://<run_id>/<kind>/<name> path, got {path!r}", field=field)
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3 or not parts[0] or parts[1] not in KINDS:
        raise UserError(
            f"{field}: must be tinker://<run_id>/<kind>/<name> with kind one of {', '.join(KINDS)}, got {path!r}",
            field=field,
        )
    return CheckpointRef(parts[0], parts[1], check_name(parts[2], field))
