"""CPU-local sandboxing for RL tools: a subprocess `SandboxInterface` and read-only SQLite."""

from treadle.rl.sandbox.limits import SandboxLimits
from treadle.rl.sandbox.sqlite_ro import QueryResult, ReadOnlySqlite
from treadle.rl.sandbox.subprocess_sandbox import SandboxStartError, SubprocessSandbox

__all__ = ["QueryResult", "ReadOnlySqlite", "SandboxLimits", "SandboxStartError", "SubprocessSandbox"]
