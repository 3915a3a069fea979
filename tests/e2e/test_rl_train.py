"""`treadle rl train ENV` for every registered env: two cookbook `rl.train` steps against a real `treadle serve`.

The CLI runs as a subprocess that sees only what a user sets (`TINKER_BASE_URL`, `TINKER_API_KEY`, offline
switches) and trains the default model (SmolLM2-135M-Instruct, renderer `qwen3_instruct`) with the smallest
settings that still make a real step: one task group of two rollouts, short turns. The checks are on the
cookbook's own `metrics.jsonl` and `checkpoints.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ServerProcess
from treadle.models.embedded import DEFAULT_MODEL
from treadle.rl.envs.registry import env_names, load_manifest

pytestmark = pytest.mark.slow

KEY = "tml-rl-e2e"
TRAIN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(Path(DEFAULT_MODEL), tmp_path_factory.mktemp("rl-data") / "server", "--api-key", KEY)
    srv.start(timeout_s=900)
    try:
        yield srv
    finally:
        srv.stop()


def _env(server: ServerProcess, workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TINKER_BASE_URL": server.base_url,
        "TINKER_API_KEY": KEY,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
        "WANDB_MODE": "disabled",
        "TINKER_COOKBOOK_RUNS_DIR": str(workdir / "runs"),
        "TREADLE_RL_CACHE": str(workdir / "cache"),
        "OMP_NUM_THREADS": "1",
    }


def _rows(log_path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]


@pytest.mark.parametrize("env_name", env_names())
def test_rl_train_two_steps(env_name: str, server: ServerProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "treadle.cli",
        "rl",
        "train",
        env_name,
        "max_steps=2",
        "group_size=2",
        "groups_per_batch=1",
        "max_tokens=16",
        "lora_rank=8",
        "level=1",
        f"log_path={log_path}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(server, tmp_path), cwd=tmp_path, timeout=TRAIN_TIMEOUT_S
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output[-6000:]}\n--- server log ---\n{server.log()}"
    assert "Training completed successfully" in output

    rows = _rows(log_path)
    assert [r["step"] for r in rows] == [0, 1]
    low, high = load_manifest(env_name)["reward"]["range"]
    for row in rows:
        assert row["env/all/total_episodes"] == 2  # groups_per_batch x group_size
        assert low <= row["env/all/reward/total"] <= high, row
        assert 1 <= row["env/all/turns_per_episode"] <= load_manifest(env_name)["limits"]["max_turns"]
        # every episode ended with a recorded stop reason
        assert any(k.startswith("env/all/stop/") for k in row), sorted(row)
        # sampler and trainer ran the same weights: the cookbook's sample/train KL is float noise
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3, row
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    final = json.loads((log_path / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["name"] == "final" and str(final["sampler_path"]).startswith("tinker://")
