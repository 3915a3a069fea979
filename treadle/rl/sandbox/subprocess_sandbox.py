"""A CPU-local sandbox: the cookbook's `SandboxInterface` on plain subprocesses.

Each sandbox owns a fresh temporary directory. Commands run under `/bin/sh -c` in that directory with a
scrubbed environment (no API keys), in their own session/process group, with rlimits (CPU time, address
space, file size, processes — see `isolation.py` for the pids cgroup used where uid 0 ignores RLIMIT_NPROC),
without network when a namespace can be made, and a wall-clock timeout after which the whole group is
SIGKILLed. Where the kernel allows (`filesystem_isolation() == "mountns"`), each command runs in a private
mount namespace (`mountns.py`): the host read-only and only the sandbox directory writable, as root too.
stdout/stderr are captured up to `max_output_bytes` each; a command that writes past that is killed. Every failure comes back as a `SandboxResult` with a non-zero exit code and an explanation in
stderr; only a sandbox that cannot start at all raises (`SandboxStartError`).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinker_cookbook.exceptions import SandboxError
from tinker_cookbook.sandbox.sandbox_interface import SandboxResult

from treadle.rl.sandbox.guard import BOOTSTRAP
from treadle.rl.sandbox.isolation import PidsGroup, filesystem_isolation, netns_prefix
from treadle.rl.sandbox.limits import SandboxLimits
from treadle.rl.sandbox.mountns import FsJail

TIMEOUT_EXIT = 124
OUTPUT_LIMIT_EXIT = 125
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _user_task_count() -> int:
    """Tasks (threads) this user runs now; 0 for root, which the kernel exempts from RLIMIT_NPROC anyway."""
    uid = os.getuid()
    if uid == 0:
        return 0
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


class SandboxStartError(SandboxError):
    """The sandbox could not be created (no temporary directory, no shell): the rollout ends with a reason."""


class SubprocessSandbox:
    """`SandboxInterface` over local subprocesses; create with `await SubprocessSandbox.create(...)`."""

    def __init__(self, root: Path, limits: SandboxLimits, network: bool) -> None:
        self.root = root
        self.limits = limits
        self.network = network
        self._closed = False

    @classmethod
    async def create(
        cls, limits: SandboxLimits | None = None, base_dir: str | None = None, network: bool = False
    ) -> SubprocessSandbox:
        try:
            root = Path(tempfile.mkdtemp(prefix="treadle-sbx-", dir=base_dir))
        except OSError as e:
            raise SandboxStartError(f"sandbox could not create its directory under {base_dir!r}: {e}") from e
        if not Path("/bin/sh").exists():
            shutil.rmtree(root, ignore_errors=True)
            raise SandboxStartError("sandbox needs /bin/sh")
        return cls(root, limits or SandboxLimits(), network)

    @property
    def sandbox_id(self) -> str:
        return self.root.name

    @property
    def network_isolated(self) -> bool:
        return not self.network and (filesystem_isolation() == "mountns" or netns_prefix() is not None)

    @property
    def filesystem_isolated(self) -> bool:
        """Commands can write only inside `root` (see `mountns.py`); else only the Python guard confines writes."""
        return filesystem_isolation() == "mountns"

    def _jail(self) -> FsJail | None:
        if not self.filesystem_isolated:
            return None
        return FsJail(str(self.root.resolve()), isolate_network=not self.network)

    async def send_heartbeat(self, timeout: int = 30) -> None:
        return None

    def _inside(self, path: str) -> Path | None:
        target = (self.root / path).resolve()
        root = self.root.resolve()
        return target if target == root or root in target.parents else None

    async def run_command(
        self, command: str, workdir: str | None = None, timeout: int = 60, max_output_bytes: int | None = None
    ) -> SandboxResult:
        if self._closed:
            return SandboxResult(stdout="", stderr="sandbox: already cleaned up", exit_code=1)
        cwd = self._inside(workdir or ".")
        if cwd is None or not cwd.is_dir():
            return SandboxResult(
                stdout="", stderr=f"sandbox: no such directory in the sandbox: {workdir}", exit_code=1
            )
        argv: list[str] = ["/bin/sh", "-c", command]
        jail = self._jail()  # the mount namespace brings its own network namespace
        prefix = netns_prefix() if jail is None else None
        if not self.network and prefix is not None:
            argv = [*prefix, *argv]
        wall = min(float(timeout), self.limits.wall_timeout_s)
        cap = min(max_output_bytes or self.limits.max_output_bytes, self.limits.max_output_bytes)
        group = PidsGroup.create(self.limits.max_processes)
        env = {"PATH": _SAFE_PATH, "HOME": str(self.root), "TMPDIR": str(self.root), "LANG": "C.UTF-8"}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(cwd),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=self._preexec(group, jail),
            )
        except (OSError, subprocess.SubprocessError) as e:
            if group is not None:
                group.remove()
            return SandboxResult(
                stdout="", stderr=f"sandbox: could not start the command: {e}", exit_code=126
            )
        try:
            return await self._collect(proc, group, wall, cap, start)
        finally:
            if group is not None:
                await asyncio.to_thread(group.remove)

    def _preexec(self, group: PidsGroup | None, jail: FsJail | None):  # noqa: ANN202 - a closure for Popen
        limits = self.limits
        # RLIMIT_NPROC counts every task of the user, not just the sandbox's: allow what already runs plus the budget
        nproc = _user_task_count() + limits.max_processes

        def setup() -> None:
            os.setsid()  # own process group: the timeout kills all of it
            if group is not None:
                try:
                    group.join()
                except OSError:
                    pass  # the cgroup refused us (e.g. a delegated v2 tree): RLIMIT_NPROC below still applies
            if jail is not None:
                jail.enter()  # after joining the cgroup (host permissions), before the rlimits (see mountns.py)
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        return setup

    async def _collect(
        self, proc: asyncio.subprocess.Process, group: PidsGroup | None, wall: float, cap: int, start: float
    ) -> SandboxResult:
        over_limit = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None

        async def drain(stream: asyncio.StreamReader) -> bytes:
            buf = bytearray()
            while chunk := await stream.read(65536):
                room = cap - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    over_limit.set()
                    break
            return bytes(buf)

        readers = asyncio.gather(drain(proc.stdout), drain(proc.stderr))
        limit_wait = asyncio.ensure_future(over_limit.wait())
        done, _ = await asyncio.wait({readers, limit_wait}, timeout=wall, return_when=asyncio.FIRST_COMPLETED)
        reason = ""
        if readers not in done:
            reason = "output limit" if over_limit.is_set() else "timeout"
            self._kill(proc, group)
        limit_wait.cancel()
        try:
            out, err = await asyncio.wait_for(readers, timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            out, err = b"", b""
        if over_limit.is_set() and not reason:
            reason = "output limit"
            self._kill(proc, group)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=5)
        except TimeoutError:
            self._kill(proc, group)
            code = await proc.wait()
        stderr = err.decode(errors="replace")
        metrics: dict[str, float] = {"wall_s": time.monotonic() - start}
        if reason == "timeout":
            stderr += f"\nsandbox: wall-clock timeout after {wall:g}s; the process group was killed"
            code, metrics["timed_out"] = TIMEOUT_EXIT, 1.0
        elif reason == "output limit":
            stderr += f"\nsandbox: output truncated at {cap} bytes; the command was killed"
            code, metrics["output_truncated"] = OUTPUT_LIMIT_EXIT, 1.0
        elif code < 0:
            stderr += f"\nsandbox: killed by signal {signal.Signals(-code).name} (a resource limit)"
        return SandboxResult(
            stdout=out.decode(errors="replace"), stderr=stderr, exit_code=code, metrics=metrics
        )

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process, group: PidsGroup | None) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if group is not None:
            group.kill_all()

    async def run_python(self, code: str, timeout: int = 10) -> SandboxResult:
        """Run Python source under the guard (`guard.py`) in the sandbox directory."""
        name = f"main_{time.monotonic_ns()}.py"
        written = await self.write_file(name, code)
        if written.exit_code != 0:
            return written
        cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-I", "-S", "-c", BOOTSTRAP, name))
        return await self.run_command(cmd, timeout=timeout)

    async def read_file(self, path: str, max_bytes: int | None = None, timeout: int = 60) -> SandboxResult:
        target = self._inside(path)
        if target is None:
            return SandboxResult(stdout="", stderr=f"sandbox: {path} is outside the sandbox", exit_code=1)
        try:
            with open(target, "rb") as f:
                data = f.read(max_bytes if max_bytes is not None else self.limits.max_output_bytes)
        except OSError as e:
            return SandboxResult(stdout="", stderr=f"sandbox: {e.strerror}: {path}", exit_code=1)
        return SandboxResult(stdout=data.decode(errors="replace"), stderr="", exit_code=0)

    async def write_file(
        self, path: str, content: str | bytes, executable: bool = False, timeout: int = 60
    ) -> SandboxResult:
        target = self._inside(path)
        if target is None:
            return SandboxResult(stdout="", stderr=f"sandbox: {path} is outside the sandbox", exit_code=1)
        data = content.encode() if isinstance(content, str) else content
        if len(data) > self.limits.file_size_bytes:
            return SandboxResult(
                stdout="", stderr="sandbox: file larger than the file-size limit", exit_code=1
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if executable:
                target.chmod(0o755)
        except OSError as e:
            return SandboxResult(stdout="", stderr=f"sandbox: {e.strerror}: {path}", exit_code=1)
        return SandboxResult(stdout="", stderr="", exit_code=0)

    async def cleanup(self) -> None:
        self._closed = True
        await asyncio.to_thread(shutil.rmtree, self.root, True)
