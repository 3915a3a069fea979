"""Sandbox containment: each escape attempt comes back as the tool's error, never as an exception or a leak."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tinker_cookbook.sandbox.sandbox_interface import SandboxInterface

from treadle.rl.sandbox import ReadOnlySqlite, SandboxLimits, SandboxStartError, SubprocessSandbox
from treadle.rl.sandbox.isolation import network_isolation, process_limit_mode
from treadle.rl.sandbox.subprocess_sandbox import OUTPUT_LIMIT_EXIT, TIMEOUT_EXIT

LIMITS = SandboxLimits(wall_timeout_s=1.5, max_output_bytes=4096)


@pytest.fixture
def sandbox() -> Iterator[SubprocessSandbox]:
    sb = asyncio.run(SubprocessSandbox.create(LIMITS))
    yield sb
    asyncio.run(sb.cleanup())
    assert not sb.root.exists()


def run(coro):  # noqa: ANN001, ANN201 - test helper
    return asyncio.run(coro)


def test_implements_cookbook_interface_and_files(sandbox: SubprocessSandbox) -> None:
    assert isinstance(sandbox, SandboxInterface)
    assert run(sandbox.write_file("data/in.txt", "hello")).exit_code == 0
    r = run(sandbox.run_command("cat data/in.txt; echo -n ' world' >> data/in.txt"))
    assert (r.exit_code, r.stdout) == (0, "hello")
    assert run(sandbox.read_file("data/in.txt")).stdout == "hello world"
    for path in ("../escape.txt", "/etc/passwd"):
        assert run(sandbox.read_file(path)).exit_code == 1
        bad = run(sandbox.write_file(path, "x"))
        assert bad.exit_code == 1 and "outside the sandbox" in bad.stderr


def test_environment_is_scrubbed(sandbox: SubprocessSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_API_KEY", "tml-secret-key")
    r = run(sandbox.run_command("env"))
    assert r.exit_code == 0 and "tml-secret-key" not in r.stdout
    assert f"PWD={sandbox.root}" in r.stdout


def test_network_refused_in_python_tool(sandbox: SubprocessSandbox) -> None:
    r = run(sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)"))
    assert r.exit_code == 1 and "PermissionError: sandbox: importing socket is not allowed" in r.stderr


@pytest.mark.skipif(network_isolation() != "netns", reason="no network namespace on this machine")
def test_network_unreachable_from_shell(sandbox: SubprocessSandbox) -> None:
    # no interface but a downed loopback: connecting anywhere fails at once (no DNS, no route)
    code = "import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('1.1.1.1', 80)))"
    r = run(sandbox.run_command(f'python3 -c "{code}"'))
    assert r.exit_code == 0 and int(r.stdout) != 0  # errno (ENETUNREACH), not a connection
    assert sandbox.network_isolated


def test_write_outside_directory_refused(sandbox: SubprocessSandbox, tmp_path: Path) -> None:
    outside = tmp_path / "planted.txt"
    r = run(sandbox.run_python(f"open({str(outside)!r}, 'w').write('pwned')"))
    assert r.exit_code == 1 and "writing outside the sandbox directory is not allowed" in r.stderr
    r = run(sandbox.run_python(f"import os\nos.remove({str(tmp_path)!r})"))
    assert r.exit_code == 1 and "outside the sandbox directory" in r.stderr
    assert not outside.exists()
    ok = run(sandbox.run_python("open('inside.txt', 'w').write('fine')"))
    assert ok.exit_code == 0 and (sandbox.root / "inside.txt").read_text() == "fine"


def test_reading_answer_files_refused(sandbox: SubprocessSandbox, tmp_path: Path) -> None:
    answers = tmp_path / "answers.json"
    answers.write_text('{"task-1": 42}')
    r = run(sandbox.run_python(f"print(open({str(answers)!r}).read())"))
    assert r.exit_code == 1 and "42" not in r.stdout
    assert "reading outside the sandbox directory is not allowed" in r.stderr
    r = run(sandbox.run_python(f"import os\nprint(os.listdir({str(tmp_path)!r}))"))
    assert r.exit_code == 1 and "answers.json" not in r.stdout


def test_process_creation_refused_in_python_tool(sandbox: SubprocessSandbox) -> None:
    for code in ("import os\nwhile True: os.fork()", "import subprocess", "import os\nos.system('ls /')"):
        r = run(sandbox.run_python(code))
        assert r.exit_code == 1 and "PermissionError: sandbox:" in r.stderr, code


@pytest.mark.skipif(process_limit_mode() == "none", reason="root without a writable pids cgroup")
def test_fork_bomb_contained(sandbox: SubprocessSandbox) -> None:
    r = run(sandbox.run_command("bomb(){ bomb|bomb& }; bomb; sleep 0.5; echo survived"))
    assert "Cannot fork" in r.stderr or r.exit_code == TIMEOUT_EXIT
    after = run(sandbox.run_command("echo next"))
    assert (after.exit_code, after.stdout) == (0, "next\n")


def test_infinite_loop_killed(sandbox: SubprocessSandbox) -> None:
    r = run(sandbox.run_python("while True:\n    pass"))
    assert r.exit_code == TIMEOUT_EXIT and r.metrics["timed_out"] == 1.0
    assert "wall-clock timeout" in r.stderr
    # a child that ignores the parent's death is in the same process group and dies with it
    r = run(sandbox.run_command("(sleep 30; echo leaked) & sleep 30"))
    assert r.exit_code == TIMEOUT_EXIT and "leaked" not in r.stdout


def test_gigabytes_of_output_truncated(sandbox: SubprocessSandbox) -> None:
    r = run(sandbox.run_python("import sys\nwhile True: sys.stdout.write('x' * 65536)"))
    assert r.exit_code == OUTPUT_LIMIT_EXIT and len(r.stdout) <= LIMITS.max_output_bytes
    assert "output truncated" in r.stderr
    r = run(sandbox.run_command("head -c 100000000 /dev/zero > big.bin"))
    assert r.exit_code != 0  # RLIMIT_FSIZE: SIGXFSZ
    assert (sandbox.root / "big.bin").stat().st_size <= LIMITS.file_size_bytes


def test_memory_limit(sandbox: SubprocessSandbox) -> None:
    r = run(sandbox.run_python("x = bytearray(4 * 1024**3)"))
    assert r.exit_code == 1 and "MemoryError" in r.stderr


def test_sandbox_that_cannot_start() -> None:
    with pytest.raises(SandboxStartError, match="could not create its directory"):
        run(SubprocessSandbox.create(base_dir="/nonexistent/treadle"))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL);"
        "INSERT INTO items(name, price) VALUES ('pen', 1.5), ('book', 12.0), ('lamp', 30.0);"
    )
    conn.commit()
    conn.close()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sql_reads(db: Path) -> None:
    q = ReadOnlySqlite(db)
    r = q.execute("SELECT name FROM items WHERE price > 10 ORDER BY price")
    assert r.error is None and r.columns == ["name"] and r.rows == [("book",), ("lamp",)]
    assert "book" in r.render()
    assert q.execute("SELECT name FROM sqlite_master").rows == [("items",)]


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO items(name, price) VALUES ('free', 0)",
        "UPDATE items SET price = 0",
        "DELETE FROM items",
        "DROP TABLE items",
        "CREATE TABLE t(x)",
        "ATTACH DATABASE '/tmp/other.db' AS other",
        "PRAGMA writable_schema = ON",
        "SELECT load_extension('/tmp/evil.so')",
        "SELECT 1; DELETE FROM items",
        "WITH x AS (SELECT 1) DELETE FROM items",
    ],
)
def test_sql_write_statements_refused(db: Path, statement: str) -> None:
    before = _digest(db)
    r = ReadOnlySqlite(db).execute(statement)
    assert r.error is not None and r.rows == []
    assert _digest(db) == before


def test_sql_statement_timeout_and_limits(db: Path) -> None:
    q = ReadOnlySqlite(db, timeout_s=0.3, max_rows=5)
    r = q.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n")
    assert r.error is not None and "statement timeout" in r.error
    r = q.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 1000) SELECT i FROM n"
    )
    assert r.truncated and len(r.rows) == 5 and "truncated" in r.render()
    small = ReadOnlySqlite(db, max_bytes=8).execute("SELECT name FROM items")
    assert small.truncated and len(small.rows) < 3
    assert q.execute("SELECT 1").rows == [(1,)]  # the connection survives a timeout
