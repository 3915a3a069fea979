"""The Python tool's in-interpreter guard: an audit hook (PEP 578) installed before the policy's code runs.

It is the second wall, under the OS limits: it refuses sockets, process creation, ctypes, writes outside the
sandbox directory and reads outside it and the standard library, so those attempts come back to the policy
as a `PermissionError` in the tool's output. Audit hooks cannot be removed once added; ctypes (the usual way
around them) cannot be imported.
"""

from __future__ import annotations

# Run as `python -I -S -c BOOTSTRAP main.py`: the bootstrap is not a file the policy can edit.
BOOTSTRAP = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_readable = tuple({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)} | {_root})
_DENIED_IMPORTS = {"_socket", "socket", "_ctypes", "ctypes", "_posixsubprocess", "subprocess",
                   "multiprocessing", "_multiprocessing", "pty", "ssl", "_ssl", "mmap", "resource"}
_PROCESS_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "os.chdir", "shutil.rmtree", "shutil.copyfile",
                "shutil.move"}
_LIST_EVENTS = {"os.listdir", "os.scandir"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return any(real == r or real.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event == "import" and args[0].split(".")[0] in _DENIED_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event.startswith("socket.") or event.startswith("ctypes."):
        raise PermissionError("sandbox: network and native calls are not allowed")
    if event in _PROCESS_EVENTS:
        raise PermissionError("sandbox: creating or signalling processes is not allowed")
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
        if writing and not _inside(path, (_root,)):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path}")
        if not writing and not _inside(path, _readable) and os.fsdecode(path) not in ("/dev/null", "/dev/urandom"):
            raise PermissionError(f"sandbox: reading outside the sandbox directory is not allowed: {path}")
    elif event in _LIST_EVENTS:
        if args and args[0] is not None and not isinstance(args[0], int) and not _inside(args[0], _readable):
            raise PermissionError(f"sandbox: listing outside the sandbox directory is not allowed: {args[0]}")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, (_root,)):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed: {a}")

sys.addaudithook(_hook)
del _hook
_main = sys.argv[1]
sys.argv = sys.argv[1:]
_code = compile(open(_main).read(), _main, "exec")
exec(_code, {"__name__": "__main__", "__file__": _main, "__builtins__": __builtins__})
"""
