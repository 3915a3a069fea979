"""The messages between a `SubprocessEngine` and its child process, and how errors cross the boundary.

Both ends use `multiprocessing.connection.Connection` over one socket, framing plain pickles (protocol 5) with
`send_bytes`: not `Connection.send`, whose pickler would pass tensors as shared-memory handles that need the
multiprocessing authkey of a common parent. Parent → child:

    ("spec", EngineSpec)                         first message: build this engine
    ("call", rid, method, args, kwargs)          an `EngineAPI` method; answered by ("ok" | "err", rid, …)
    ("sample", rid, SampleRequest, stream)       answered by ("tok", rid, i, token, logprob)* then "ok"/"err"
    ("cancel", rid)                              stop that sample (its answer is an "err" the parent ignores)
    ("close",)

Child → parent: ("ready", EngineInfo) or ("failed", error) once, then the answers above. Only the child's own
`Engine` runs model code; the parent process holds no weights.

Errors travel as plain fields and are rebuilt as the same `TreadleError` subclass, message and field, so the
service cannot tell a remote engine's refusal from an in-process one's. Anything else becomes a `TreadleError`
(category `server`) naming the exception type.
"""

from __future__ import annotations

import importlib
import pickle
from multiprocessing.connection import Connection
from typing import Any

from treadle.errors import TreadleError

ErrorFields = tuple[str, str, str, str | None]  # module, class name, message, field


def send(conn: Connection, msg: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=5))


def recv(conn: Connection) -> tuple[Any, ...]:
    return pickle.loads(conn.recv_bytes())


def pack_error(e: BaseException) -> ErrorFields:
    if isinstance(e, TreadleError):
        return (type(e).__module__, type(e).__qualname__, e.message, e.field)
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "not enough memory" in str(e):
        return (
            "treadle.errors",
            "TreadleError",
            f"out of memory: the worker could not allocate memory for this request ({type(e).__name__}: "
            f"{str(e)[:300]}); the worker keeps serving — retry with fewer tokens or a smaller batch",
            None,
        )
    return ("treadle.errors", "TreadleError", f"internal error: {type(e).__name__}: {str(e)[:500]}", None)


def unpack_error(fields: ErrorFields) -> TreadleError:
    module, name, message, field = fields
    cls: Any = TreadleError
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, TreadleError):
            cls = obj
    except (ImportError, AttributeError):
        pass
    err = cls.__new__(cls)
    TreadleError.__init__(err, message, field=field)
    return err
