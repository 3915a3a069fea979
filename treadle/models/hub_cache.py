"""The local Hugging Face hub cache: find a model's snapshot by name, and register a treadle-converted directory
there so `AutoTokenizer.from_pretrained(name)` (and tinker-cookbook's `get_tokenizer`) work offline.

Layout (huggingface_hub): `<cache>/models--{org}--{name}/refs/main` holds a revision; the files live in
`snapshots/<revision>/`. A registration never replaces a snapshot that treadle did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from treadle.atomic import atomic_write_dir, atomic_write_text

_OWNED = ".treadle-owned.json"  # lists the revisions treadle wrote; lives beside refs/, which the hub ignores
_LINKED = {"model.safetensors"}  # large files are symlinked, the rest copied so they outlive a temp source
# Optional files transformers probes for when loading a tokenizer/config/model by name. With the hub unreachable
# (not HF_HUB_OFFLINE), a probe for a file absent from the snapshot is retried with backoff for ~30 s each,
# unless the hub's own ".no_exist" marker says the file is known to be missing at that revision.
PROBED_OPTIONAL = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    "tokenizer.model",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.json",
)


def hub_cache_dir() -> Path:
    """Where huggingface_hub reads, from the environment now (its constants are frozen at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_folder(repo_id: str, hub_cache: Path | None = None) -> Path:
    return (hub_cache or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"


def find_snapshot(repo_id: str, hub_cache: Path | None = None) -> Path | None:
    """The snapshot `refs/main` points to, else the newest snapshot holding a config.json; None if absent."""
    repo = repo_folder(repo_id, hub_cache)
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = repo / "snapshots"
    candidates = (
        [s for s in snaps.iterdir() if not s.name.startswith(".") and (s / "config.json").exists()]
        if snaps.is_dir()
        else []
    )
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


def _owned(repo: Path) -> list[str]:
    try:
        return list(json.loads((repo / _OWNED).read_text()))
    except (OSError, ValueError):
        return []


def register_snapshot(repo_id: str, directory: Path, hub_cache: Path | None = None) -> Path | None:
    """Expose `directory` as `repo_id`'s main snapshot; returns it, or None when a foreign snapshot is kept."""
    directory = directory.resolve()
    repo = repo_folder(repo_id, hub_cache)
    rev = hashlib.sha1(f"treadle:{repo_id}:{directory}".encode()).hexdigest()
    owned = _owned(repo)
    ref = repo / "refs" / "main"
    if ref.is_file():
        current = ref.read_text().strip()
        if current not in owned and (repo / "snapshots" / current).is_dir():
            return None  # the user's real download wins
        if current == rev and _same_files(repo / "snapshots" / rev, directory):
            return repo / "snapshots" / rev  # rewriting would race with processes reading it right now
    snaps = repo / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    snap = snaps / rev
    with atomic_write_dir(snap, overwrite=True) as tmp:
        for f in directory.iterdir():
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.name in _LINKED:
                (tmp / f.name).symlink_to(f)
            else:
                shutil.copy2(f, tmp / f.name)
    _mark_missing(repo / ".no_exist" / rev, snap)
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(repo / _OWNED, json.dumps([rev]))
    atomic_write_text(ref, rev)
    for old in owned:  # earlier treadle registrations (e.g. tokenizer-only) are superseded
        if old != rev:
            shutil.rmtree(snaps / old, ignore_errors=True)
            shutil.rmtree(repo / ".no_exist" / old, ignore_errors=True)
    return snap


def _registered_names(directory: Path) -> set[str]:
    return {f.name for f in directory.iterdir() if f.is_file() and not f.name.startswith(".")}


def _same_files(snap: Path, directory: Path) -> bool:
    return snap.is_dir() and _registered_names(snap) == _registered_names(directory)


def _mark_missing(no_exist: Path, snap: Path) -> None:
    # Rebuilt on every registration: a marker left from a smaller registration would hide a file added now.
    shutil.rmtree(no_exist, ignore_errors=True)
    no_exist.mkdir(parents=True)
    for name in PROBED_OPTIONAL:
        if not (snap / name).exists():
            (no_exist / name).touch()
