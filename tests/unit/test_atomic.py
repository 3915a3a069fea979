"""treadle.atomic under `kill -9`: whatever instant a writer dies, readers see the old version or the
complete new one at the final name, never a partial one (ARCHITECTURE invariant 5)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from treadle.atomic import atomic_write_dir, atomic_write_text, build_once, publish_dir
from treadle.errors import ConflictError

N_FILES = 40
# Writes generation G of a directory (N_FILES files, each holding G) and of a file, forever, slowly enough
# that a kill lands mid-write most of the time.
_WRITER = f"""
import sys, time
from pathlib import Path
from treadle.atomic import atomic_write_dir, atomic_write_text
root = Path(sys.argv[1])
gen = int(sys.argv[2])
while True:
    gen += 1
    with atomic_write_dir(root / "ckpt", overwrite=True) as tmp:
        for i in range({N_FILES}):
            (tmp / f"part-{{i}}.bin").write_bytes(str(gen).encode() * 2048)
    atomic_write_text(root / "ref", str(gen))
    print(gen, flush=True)
"""


def _check_consistent(root: Path) -> int | None:
    """The generation visible at the final names, asserting it is complete; None if nothing is there yet."""
    ckpt = root / "ckpt"
    if not ckpt.exists():
        return None
    parts = sorted(ckpt.iterdir())
    assert len(parts) == N_FILES, f"half-written directory visible: {len(parts)} files"
    gens = {p.read_bytes()[: len(p.read_bytes()) // 2048] for p in parts}
    assert len(gens) == 1, f"files from different generations mixed: {gens}"
    ref = root / "ref"
    if ref.exists():
        assert ref.read_text().isdigit(), f"half-written file visible: {ref.read_text()!r}"
    return int(gens.pop())


@pytest.mark.slow
def test_kill_9_at_random_moments_never_exposes_a_partial_write(tmp_path: Path) -> None:
    rng = random.Random(1234)
    seen: set[int] = set()
    gen = 0
    for _trial in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(gen)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one complete generation, so the kill can land in an overwrite
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        visible = _check_consistent(tmp_path)
        assert visible is not None
        seen.add(visible)
        gen = visible + 1000  # the next writer's generations are distinguishable
    assert len(seen) == 12
    # temporaries of killed writers may remain, but only under hidden names that listings skip
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name not in ("ckpt", "ref"))


def test_failed_write_leaves_the_old_version(tmp_path: Path) -> None:
    final = tmp_path / "d"
    with atomic_write_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_write_dir(final, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("boom")
    assert (final / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_existing_target_is_a_conflict_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with (
        pytest.raises(ConflictError, match="checkpoint"),
        atomic_write_dir(tmp_path / "d", field="checkpoint"),
    ):
        pass
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ConflictError):
        publish_dir(src, tmp_path / "d", overwrite=False)


def test_build_once_builds_once(tmp_path: Path) -> None:
    calls: list[Path] = []

    def fill(d: Path) -> None:
        calls.append(d)
        atomic_write_text(d / "x", "1")

    assert build_once(tmp_path / "t", fill) is True
    assert build_once(tmp_path / "t", fill) is False
    assert len(calls) == 1 and (tmp_path / "t" / "x").read_text() == "1"
