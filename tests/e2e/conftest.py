"""A real `treadle serve` subprocess on a tiny random-init model, driven over HTTP by the official SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from treadle.models.tiny import write_tiny_model

API_KEY = "tml-e2e"


def _die_with_parent() -> None:
    """Runs in the server child before exec: the kernel sends it SIGKILL when the test process dies, so an
    interrupted or killed test run leaves no server behind (prctl PR_SET_PDEATHSIG, Linux)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Start/stop `python -m treadle.server` (the same entry as `treadle serve`) and wait for healthz."""

    def __init__(self, model_dir: Path, data_dir: Path, *extra_args: str) -> None:
        self.model = str(model_dir)
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "treadle.server",
            "--port",
            str(self.port),
            "--model",
            self.model,
            "--data-dir",
            str(self.data_dir),
            *self.extra_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/api/v1/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout_s}s:\n{self.log()}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def e2e_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")


# The shared server's body limit: small enough that a test can stream a body past it quickly.
E2E_MAX_REQUEST_MB = 4


@pytest.fixture(scope="session")
def tinker_server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        e2e_model_dir,
        tmp_path_factory.mktemp("data") / "server",
        "--max-request-mb",
        str(E2E_MAX_REQUEST_MB),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
