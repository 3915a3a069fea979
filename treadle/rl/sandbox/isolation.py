"""How this machine can isolate sandboxed commands: mount and network namespaces, a pids cgroup, or neither.

- Filesystem: a private mount namespace (see `mountns.py`) in which the host is read-only, `/tmp`,
  `/var/tmp`, `/dev/shm`, `/run` and `/proc` are empty, `/dev` has only null/zero/random-like devices, and
  only the sandbox directory is writable — as root too, since the command runs in a user namespace without
  capabilities. `filesystem_isolation()` is "mountns" when a probe command here could not write next to its
  directory but could write inside it; else "none": shell commands can then write wherever the host user
  can, and only the Python tool's audit-hook guard (`guard.py`) refuses writes and reads outside the sandbox
  directory.

- Network: a network namespace (only a downed loopback, so no route anywhere), made together with the mount
  namespace, or by `unshare -rn` where only that works, when the kernel allows it — as root, or with
  unprivileged user namespaces. Without it, commands keep the host network and `network_isolation()` says
  "none"; the Python tool still refuses sockets (see `guard.py`).
- Processes: a cgroup-v1/v2 pids group with `pids.max` when its directory is writable (root on most Linux
  hosts and containers), else RLIMIT_NPROC (effective for non-root users; the kernel exempts uid 0).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from functools import cache
from pathlib import Path

_PIDS_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


@cache
def netns_prefix() -> tuple[str, ...] | None:
    """argv prefix that runs a command without network, or None when no namespace can be made here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (unshare, "-rn") if probe.returncode == 0 else None


def network_isolation() -> str:
    return "netns" if filesystem_isolation() == "mountns" or netns_prefix() is not None else "none"


@cache
def filesystem_isolation() -> str:
    """Probed once: "mountns" when sandboxed commands see the host read-only, else "none"."""
    try:
        from treadle.rl.sandbox.mountns import FsJail
    except (OSError, AttributeError):  # no libc with unshare/mount (not Linux)
        return "none"
    with tempfile.TemporaryDirectory(prefix="treadle-sbx-probe-") as outer:
        box = Path(outer, "box")
        box.mkdir()
        script = "echo in > inside; (echo out > ../outside) 2>/dev/null; true"
        try:
            subprocess.run(
                ["/bin/sh", "-c", script],
                cwd=box,
                preexec_fn=FsJail(str(box.resolve())).enter,
                capture_output=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return "none"
        contained = (box / "inside").exists() and not Path(outer, "outside").exists()
    return "mountns" if contained else "none"


@cache
def _pids_root() -> Path | None:
    for root in _PIDS_ROOTS:
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            if root.name == "pids" or "pids" in (root / "cgroup.subtree_control").read_text(errors="replace"):
                return root
    return None


class PidsGroup:
    """A throwaway pids cgroup: `join()` in the child, `kill_all()` + `remove()` in the parent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def create(max_processes: int) -> PidsGroup | None:
        root = _pids_root()
        if root is None:
            return None
        path = root / f"treadle-sbx-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(max_processes))
        except OSError:
            return None
        return PidsGroup(path)

    def join(self) -> None:
        """Move the calling process in (called from the child's preexec, before exec)."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def kill_all(self) -> None:
        # members can leave the process group (setsid) but not the cgroup
        for _ in range(20):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                import time

                time.sleep(0.02)


def process_limit_mode() -> str:
    if _pids_root() is not None:
        return "cgroup"
    return "rlimit" if os.geteuid() != 0 else "none"
