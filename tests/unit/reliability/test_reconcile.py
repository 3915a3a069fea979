"""Regression test for the crash-trial finding "on disk but not in the DB": a checkpoint directory a kill -9
left without its DB row is removed at start; recorded checkpoints and hidden temporaries are left alone."""

from __future__ import annotations

from pathlib import Path

from treadle.service.reconcile import remove_orphan_checkpoints
from treadle.store import CheckpointRow, MetadataStore, utcnow


def _ckpt(root: Path, run: str, kind: str, name: str) -> Path:
    d = root / run / kind / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_orphans_removed_recorded_kept(tmp_path: Path) -> None:
    store = MetadataStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    root = tmp_path / "checkpoints"
    kept = _ckpt(root, "r1", "weights", "saved")
    store.upsert_checkpoint(CheckpointRow("r1", "weights", "saved", "o", utcnow(), 2, False, None, {}))
    orphan = _ckpt(root, "r1", "weights", "cut-by-kill")
    orphan_export = _ckpt(root, "r2", "external_weights", "x")
    temp = _ckpt(root, "r1", "weights", ".saved.tmp-1-abc")
    other = _ckpt(root, "r1", "not-a-kind", "y")
    assert remove_orphan_checkpoints(store, root) == 2
    assert kept.is_dir() and temp.is_dir() and other.is_dir()
    assert not orphan.exists() and not orphan_export.exists()
    assert [p.name for p in (root / "r1" / "weights").iterdir() if "orphan" in p.name] == []
    assert remove_orphan_checkpoints(store, root) == 0
    store.close()
