"""Resource limits for one sandboxed command (rlimits, wall clock, captured output)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5  # RLIMIT_CPU per process
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS per process
    file_size_bytes: int = 8 * 2**20  # RLIMIT_FSIZE: largest file a command may write
    max_processes: int = 32  # pids cgroup when writable, else RLIMIT_NPROC (which root ignores)
    wall_timeout_s: float = 10.0  # the whole process group is SIGKILLed after this
    max_output_bytes: int = 16 * 1024  # stdout and stderr each; past it the command is killed
