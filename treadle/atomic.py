"""Atomic publication of files and directories: build under a temporary sibling name, fsync, rename.

A crash at any point leaves either nothing (or the previous version) at the final name, or the complete new
one — never a half-written one (ARCHITECTURE invariant 5). Every layer that publishes to disk (LoRA
checkpoints, model conversion, the hub-cache registration, exports and checkpoint copies) uses these helpers,
so there is one behaviour to test. Leftover temporaries carry a leading dot and a `.tmp-` infix, so listings
skip them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from treadle.errors import ConflictError


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    # children before parents, so each directory entry is durable once its directory is synced
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def temp_sibling(final: Path, tag: str = "tmp") -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_dir(tmp: Path, final: Path, *, overwrite: bool = True, field: str = "path") -> None:
    """Make the fully written directory `tmp` appear as `final` in one rename, after fsyncing it.

    With `overwrite`, an existing `final` is moved aside first and deleted after the rename, so readers see
    the old directory or the new one, never a mix; without it an existing `final` is a `ConflictError`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(tmp)
    old: Path | None = None
    if final.exists():
        if not overwrite:
            raise ConflictError(f"{field}: {final} already exists; choose another name", field=field)
        old = temp_sibling(final, "old")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write_dir(final: Path, *, overwrite: bool = False, field: str = "path") -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; on normal exit it becomes `final` atomically.

    On an exception the temporary directory is removed and `final` is untouched. If `final` exists,
    `ConflictError` is raised (before any work) unless `overwrite`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ConflictError(f"{field}: {final} already exists; choose another name", field=field)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final, overwrite=overwrite, field=field)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace the file `path` with `data` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(target: Path, fill: Callable[[Path], None]) -> bool:
    """Create the directory `target` once, across processes: `fill` writes it into a temporary sibling,
    which is published atomically. Returns True if this call built it, False if it already existed (or
    another process finished it while this one waited for the lock)."""
    if target.is_dir():
        return False
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return False
        with atomic_write_dir(target) as tmp:
            fill(tmp)
    return True
