"""Identifiers the SDK assumes (protocol §3): model ids, sampler ids, `tinker://` checkpoint paths and the
`<kind>/<name>` checkpoint ids of the REST routes. The naming rules live here (and, for what becomes a path on
disk, in the store below): the API asks this module, never the store."""

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


def checkpoint_ref(run_id: str, kind: str, name: str, field: str = "checkpoint_id") -> CheckpointRef:
    """The checkpoint a REST path's `run_id`, `kind` and `name` name, checked; a 400 naming `field` otherwise."""
    if kind not in KINDS:
        raise UserError(f"{field}: kind must be one of {', '.join(KINDS)}, got {kind!r}", field=field)
    return CheckpointRef(run_id, kind, check_name(name, field))


def checkpoint_id_parts(
    rest: str, actions: tuple[str, ...] = (), field: str = "checkpoint_id"
) -> tuple[str, str, str | None]:
    """`<kind>/<name>` or `<kind>/<name>/<action>` (action one of `actions`) → (kind, name, action or None),
    checked; otherwise a 400 naming `field` and the expected form (or the bad name, if only that is wrong)."""
    parts = rest.split("/")
    if len(parts) in (2, 3) and parts[0] in KINDS and (len(parts) == 2 or parts[2] in actions):
        return parts[0], check_name(parts[1], field), parts[2] if len(parts) == 3 else None
    then = f" (optionally followed by /{', /'.join(actions)})" if actions else ""
    raise UserError(
        f"{field}: must be <kind>/<name> with kind one of {', '.join(KINDS)} and a name of letters, "
        f"digits, '.', '_', ':' or '-'{then}, got {rest[:200]!r}",
        field=field,
    )
