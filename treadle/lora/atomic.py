"""Atomic directory writes: build under a temporary sibling name, fsync, then rename into place.

A crash at any point leaves either no directory or the complete one at the final name, never a half-written
one (ARCHITECTURE invariant 5). Other layers (checkpoint store, model conversion) import `atomic_write_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from treadle.errors import ConflictError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # children before parents, so each directory entry is durable once its directory is synced
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_write_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; on normal exit it becomes `final` atomically.

    On an exception the temporary directory is removed and `final` is untouched. If `final` exists,
    `ConflictError` is raised unless `overwrite`; with `overwrite` the old directory is moved aside before
    the rename and deleted after it, so readers see the old or the new directory, never a mix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ConflictError(f"checkpoint path: {final} already exists; choose another name", field="path")
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old: Path | None = None
        if final.exists():
            if not overwrite:
                raise ConflictError(
                    f"checkpoint path: {final} already exists; choose another name", field="path"
                )
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
