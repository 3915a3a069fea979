"""Filesystem containment of shell commands (issue 13): writes outside the sandbox directory fail, as root too.

Where the kernel gives no mount namespace (`filesystem_isolation() == "none"`) the `needs_mountns` tests are
skipped: shell commands there can write wherever the host user can, and only the Python tool's audit-hook
guard confines writes and reads (`test_python_tool_writes_outside_refused_everywhere` and test_sandbox.py,
which run everywhere).
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from treadle.rl.sandbox import SandboxLimits, SubprocessSandbox
from treadle.rl.sandbox.isolation import filesystem_isolation
from treadle.rl.sandbox.mountns import FsJail

needs_mountns = pytest.mark.skipif(
    filesystem_isolation() != "mountns",
    reason="no mount namespace here: shell commands write wherever the host user can; "
    "only the Python tool's guard confines writes (test_sandbox.py)",
)

LIMITS = SandboxLimits(wall_timeout_s=5.0, max_output_bytes=8192)
HOST_TARGETS = ["/tmp", "/var/tmp", "/dev/shm", str(Path.home()), "/etc", "SIBLING"]


def run(coro):  # noqa: ANN001, ANN201 - test helper
    return asyncio.run(coro)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SubprocessSandbox]:
    # under tmp_path, so "next to the sandbox dir" is a host directory the test can inspect
    sb = run(SubprocessSandbox.create(LIMITS, base_dir=str(tmp_path)))
    yield sb
    run(sb.cleanup())


def _target_dir(name: str, sandbox: SubprocessSandbox) -> Path:
    return sandbox.root.parent if name == "SIBLING" else Path(name)


def _planted(directory: Path) -> Path:
    return directory / f"treadle-h13-{uuid.uuid4().hex[:10]}"


def test_isolation_reported(sandbox: SubprocessSandbox) -> None:
    assert filesystem_isolation() in ("mountns", "none")
    assert sandbox.filesystem_isolated == (filesystem_isolation() == "mountns")


def test_python_tool_writes_outside_refused_everywhere(sandbox: SubprocessSandbox) -> None:
    """With or without a mount namespace, the Python tool's guard refuses every outside write."""
    for where in HOST_TARGETS:
        target = _planted(_target_dir(where, sandbox))
        r = run(sandbox.run_python(f"open({str(target)!r}, 'w').write('pwned')"))
        assert r.exit_code == 1 and "writing outside the sandbox directory is not allowed" in r.stderr, r
        assert not target.exists()


@needs_mountns
@pytest.mark.parametrize("where", HOST_TARGETS)
def test_shell_writes_outside_fail(sandbox: SubprocessSandbox, where: str) -> None:
    directory = _target_dir(where, sandbox)
    if not directory.is_dir():
        pytest.skip(f"{directory} does not exist on this host")
    assert run(sandbox.write_file("inside.txt", "data")).exit_code == 0
    commands = {
        "redirect": "echo pwned > {p}",
        "append": "echo pwned >> {p}",
        "touch": "touch {p}",
        "cp": "cp inside.txt {p}",
        "mkdir": "mkdir {p}",
    }
    for verb, template in commands.items():
        target = _planted(directory)
        r = run(sandbox.run_command(template.format(p=shlex.quote(str(target)))))
        assert r.exit_code != 0, (verb, target, r)
        assert "Read-only file system" in r.stderr, (verb, r.stderr)
        assert not target.exists(), (verb, target)


@needs_mountns
def test_python_subprocess_writes_outside_fail(sandbox: SubprocessSandbox) -> None:
    """A plain interpreter (no guard) writing itself and through `subprocess` gets EROFS everywhere outside."""
    targets = [_planted(_target_dir(w, sandbox)) for w in HOST_TARGETS if _target_dir(w, sandbox).is_dir()]
    code = (
        "import subprocess, sys\n"
        "for p in sys.argv[1:]:\n"
        "    r = subprocess.run(['sh', '-c', f'echo pwned > {p}'], capture_output=True, text=True)\n"
        "    print('sub', r.returncode, 'Read-only' in r.stderr)\n"
        "    try:\n"
        "        open(p, 'w').write('pwned')\n"
        "        print('open', 0)\n"
        "    except OSError as e:\n"
        "        print('open', e.errno)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "subprocess.run(['sh', '-c', 'echo also > inside2.txt'], check=True)\n"
    )
    argv = [sys.executable, "-c", code, *map(str, targets)]
    r = run(sandbox.run_command(" ".join(shlex.quote(a) for a in argv)))
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines.count("sub 2 True") == len(targets), lines  # sh: cannot create ...: Read-only file system
    assert lines.count("open 30") == len(targets), lines  # EROFS
    assert not any(t.exists() for t in targets)
    assert (sandbox.root / "inside.txt").read_text() == "fine"
    assert (sandbox.root / "inside2.txt").read_text() == "also\n"


@needs_mountns
def test_writes_inside_still_work(sandbox: SubprocessSandbox) -> None:
    r = run(
        sandbox.run_command(
            "mkdir -p sub/deeper && echo one > sub/deeper/a.txt && cp sub/deeper/a.txt b.txt && "
            "rm sub/deeper/a.txt && mktemp && ls /tmp"
        )
    )
    assert r.exit_code == 0, r
    tmp_file, listing = r.stdout.splitlines()[0], r.stdout.splitlines()[1:]
    assert Path(tmp_file).parent == sandbox.root.resolve()  # TMPDIR is the sandbox dir
    assert (sandbox.root / "b.txt").read_text() == "one\n" and not (
        sandbox.root / "sub/deeper/a.txt"
    ).exists()
    # the host's /tmp is an empty tmpfs in there: only the path down to the sandbox dir's mount point shows
    root = sandbox.root.resolve()
    assert listing == ([root.parts[2]] if root.parts[1] == "tmp" else []), listing
    sub = run(sandbox.run_command("pwd && echo deep > here.txt", workdir="sub"))
    assert (sub.exit_code, sub.stdout) == (0, f"{root}/sub\n"), sub  # a workdir stays the workdir
    assert (sandbox.root / "sub/here.txt").read_text() == "deep\n"
    py = run(
        sandbox.run_python("open('from_python.txt', 'w').write('ok')\nprint(open('b.txt').read(), end='')")
    )
    assert (py.exit_code, py.stdout) == (0, "one\n")
    assert (sandbox.root / "from_python.txt").read_text() == "ok"


@needs_mountns
def test_containment_cannot_be_undone(sandbox: SubprocessSandbox) -> None:
    """No capabilities: remount, unmount, a nested namespace or /proc/1/root lead back to nothing writable."""
    target = _planted(Path("/etc"))
    attempts = [
        f"mount -o remount,rw / ; echo x > {target}",
        f"umount -l /tmp ; umount -l / ; echo x > {target}",
        f"unshare -rm sh -c 'mount -o remount,rw / && echo x > {target}'",
        f"echo x > /proc/1/root{target}",
        f"echo x > /proc/self/root{target}",
    ]
    for cmd in attempts:
        r = run(sandbox.run_command(cmd))
        assert r.exit_code != 0, (cmd, r)
        assert not target.exists(), cmd
    nested = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]\n"
        "print(libc.unshare(0x10000000 | 0x20000))\n"  # a nested user + mount namespace is allowed...
        "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"  # ...its copy is locked
        f"open({str(target)!r}, 'w')\n"
    )
    r = run(sandbox.run_command(f"{shlex.quote(sys.executable)} -c {shlex.quote(nested)}"))
    assert r.exit_code == 1 and r.stdout.splitlines()[1] == "-1 1", r  # EPERM
    assert "OSError" in r.stderr and not target.exists()


@needs_mountns
def test_host_temporary_files_and_processes_hidden(sandbox: SubprocessSandbox) -> None:
    """Reading the env's answer files in the host's /tmp, or its memory through /proc, is refused."""
    with tempfile.TemporaryDirectory(dir="/tmp") as host_dir:
        answers = Path(host_dir, "answers.json")
        answers.write_text('{"task-1": 4242}')
        r = run(sandbox.run_command(f"cat {answers}; ls /tmp/{Path(host_dir).name}; cat /proc/1/environ"))
        assert r.exit_code != 0 and "4242" not in r.stdout
        assert "No such file or directory" in r.stderr
        other = run(SubprocessSandbox.create(LIMITS))
        try:
            run(other.write_file("secret.txt", "4242"))
            r = run(sandbox.run_command(f"cat {other.root}/secret.txt"))
            assert r.exit_code != 0 and "4242" not in r.stdout
        finally:
            run(other.cleanup())
    r = run(sandbox.run_command("ls /proc"))
    assert (r.exit_code, r.stdout) == (0, "")


@needs_mountns
def test_remount_fallback_for_old_kernels(
    sandbox: SubprocessSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mount_setattr(2) (Linux < 5.12) each mount is remounted read-only one by one: same containment."""
    root = str(sandbox.root.resolve())
    monkeypatch.setattr(sandbox, "_jail", lambda: FsJail(root, use_mount_setattr=False))
    outside = [_planted(sandbox.root.parent), _planted(Path("/etc")), _planted(Path("/tmp"))]
    for target in outside:
        r = run(sandbox.run_command(f"echo x > {target}"))
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, r
        assert not target.exists()
    r = run(sandbox.run_command("echo in > inside.txt && cat inside.txt"))
    assert (r.exit_code, r.stdout) == (0, "in\n"), r


@needs_mountns
def test_host_daemon_sockets_under_run_hidden(sandbox: SubprocessSandbox) -> None:
    """A root daemon's Unix socket under /run (docker, dbus) cannot be connected to: /run is empty in there."""
    path = Path("/run", f"treadle-h13-{uuid.uuid4().hex[:10]}.sock")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
    except OSError:
        server.close()
        pytest.skip("/run is not writable here, so no host socket to plant")
    try:
        server.listen(1)
        code = f"import socket\nprint(socket.socket(socket.AF_UNIX).connect_ex({str(path)!r}))"
        r = run(sandbox.run_command(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"))
        assert (r.exit_code, r.stdout.strip()) == (0, "2"), r  # ENOENT, not a connection
    finally:
        server.close()
        path.unlink()


@needs_mountns
def test_dev_has_only_harmless_devices(sandbox: SubprocessSandbox) -> None:
    """No disks, consoles, kvm or fuse: /dev is a read-only tmpfs with null, zero, full, random, urandom."""
    r = run(sandbox.run_command("ls /dev; echo x > /dev/null && head -c 3 /dev/zero | wc -c"))
    assert r.exit_code == 0, r
    assert r.stdout.split() == ["full", "null", "random", "shm", "urandom", "zero", "3"]
    r = run(sandbox.run_command("echo x > /dev/kmsg"))
    assert r.exit_code != 0 and "Read-only file system" in r.stderr


@needs_mountns
def test_cannot_leave_or_raise_the_pids_cgroup(sandbox: SubprocessSandbox) -> None:
    """cgroupfs is read-only in there: a command cannot move itself out of its pids group or raise pids.max."""
    procs = [
        p for p in ("/sys/fs/cgroup/pids/cgroup.procs", "/sys/fs/cgroup/cgroup.procs") if Path(p).exists()
    ]
    if not procs:
        pytest.skip("no cgroup filesystem here")
    for path in procs:
        r = run(sandbox.run_command(f"echo $$ > {path}"))
        assert r.exit_code != 0 and "Read-only file system" in r.stderr, r
