"""Read-only SQL on SQLite: one statement, a wall-clock statement timeout, row and byte limits.

Three locks keep a query read-only whatever its text: the file is opened `mode=ro`, `PRAGMA query_only` is on,
and an authorizer allows only reads, SELECT and plain functions (no ATTACH, PRAGMA, writes or
`load_extension`). A progress handler aborts a statement past its deadline (a recursive CTE, a cross join).
Errors come back in `QueryResult.error`, never raised.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
_PROGRESS_EVERY = 1000  # VM instructions between deadline checks


@dataclass
class QueryResult:
    columns: list[str] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    truncated: bool = False
    error: str | None = None

    def render(self, max_rows: int = 20) -> str:
        """The result as text for the policy: a header and rows, or the error."""
        if self.error is not None:
            return f"Error: {self.error}"
        lines = [" | ".join(self.columns)]
        lines += [" | ".join(str(v) for v in row) for row in self.rows[:max_rows]]
        shown = min(len(self.rows), max_rows)
        if self.truncated or len(self.rows) > shown:
            lines.append(f"... ({shown} rows shown; result truncated)")
        else:
            lines.append(f"({len(self.rows)} rows)")
        return "\n".join(lines)


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class ReadOnlySqlite:
    """A read-only connection to one database file; `execute(sql)` runs one statement under the limits."""

    def __init__(
        self, path: str | Path, timeout_s: float = 2.0, max_rows: int = 200, max_bytes: int = 64 * 1024
    ):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA query_only = ON")
        self._conn.set_authorizer(_authorizer)
        self._deadline = 0.0
        self._conn.set_progress_handler(self._over_deadline, _PROGRESS_EVERY)

    def _over_deadline(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def execute(self, sql: str) -> QueryResult:
        self._deadline = time.monotonic() + self.timeout_s
        try:
            cursor = self._conn.execute(sql)
            columns = [d[0] for d in cursor.description or []]
            rows: list[tuple[Any, ...]] = []
            size = 0
            truncated = False
            for row in cursor:
                size += sum(len(str(v)) for v in row)
                if len(rows) >= self.max_rows or size > self.max_bytes:
                    truncated = True
                    break
                rows.append(tuple(row))
            cursor.close()
            return QueryResult(columns, rows, truncated)
        except sqlite3.OperationalError as e:
            if str(e) == "interrupted":
                return QueryResult(error=f"statement timeout: stopped after {self.timeout_s:g}s")
            return QueryResult(error=_explain(str(e)))
        except (sqlite3.Error, ValueError, OverflowError) as e:
            return QueryResult(error=_explain(str(e)))
        finally:
            self._deadline = 0.0

    def close(self) -> None:
        self._conn.close()


def _explain(message: str) -> str:
    if message == "not authorized" or "prohibited" in message:
        return f"{message} (the database is read-only: only a single SELECT is allowed)"
    return message
