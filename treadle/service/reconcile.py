"""Start-up reconciliation of checkpoint files with the metadata DB after a crash: a checkpoint directory with
no DB row is a save (or copy, or export) that a crash cut between publishing its files and recording its row,
or a delete cut between removing the row and the files. Nobody was told it exists (its future failed with
category `server`) and no listing shows it, so it is removed — first renamed to a hidden temporary, so even a
crash during the removal leaves nothing visible (issue 11 crash trials)."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from treadle.store import KINDS, MetadataStore

log = logging.getLogger(__name__)


def remove_orphan_checkpoints(store: MetadataStore, root: Path) -> int:
    """Remove checkpoint directories under `root` (`<run>/<kind>/<name>`) without a DB row; returns how many."""
    removed = 0
    for d in root.glob("*/*/*"):
        run, kind, name = d.parent.parent.name, d.parent.name, d.name
        if not d.is_dir() or name.startswith(".") or kind not in KINDS:
            continue
        if store.get_checkpoint(run, kind, name) is not None:
            continue
        hidden = d.parent / f".{name}.orphan-{uuid.uuid4().hex[:8]}"
        os.rename(d, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        removed += 1
    if removed:
        log.warning("removed %d checkpoint directories that a crash left without a DB row", removed)
    return removed
