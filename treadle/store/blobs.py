"""Checkpoint blobs on local disk: one directory per checkpoint under `<data_dir>/checkpoints`.

The engine writes each checkpoint atomically (temporary name, fsync, rename); this module only decides
where checkpoints live, measures and deletes them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from treadle.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,200}$")
KINDS = ("weights", "sampler_weights", "external_weights")


def check_name(name: str, field: str = "path") -> str:
    """Checkpoint names become path components and `tinker://` parts, so '/' and '..' are refused."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise UserError(
            f"{field}: checkpoint name must be 1-200 characters of letters, digits, '.', '_', ':' or '-', "
            f"got {name!r}",
            field=field,
        )
    return name


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, run_id: str, kind: str, name: str) -> Path:
        assert kind in KINDS, kind
        return self.root / run_id / kind / name

    def exists(self, run_id: str, kind: str, name: str) -> bool:
        return self.path(run_id, kind, name).is_dir()

    def size(self, run_id: str, kind: str, name: str) -> int:
        p = self.path(run_id, kind, name)
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0

    def delete(self, run_id: str, kind: str, name: str) -> None:
        shutil.rmtree(self.path(run_id, kind, name), ignore_errors=True)
