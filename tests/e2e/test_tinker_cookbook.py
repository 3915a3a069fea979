"""Official `tinker-cookbook` recipes, unmodified, run two steps each against `treadle serve` (tiny model,
`renderer_name=role_colon`): supervised chat on the bundled conversations and multi-turn RL (guess_number)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


def _run(recipe: str, args: list[str], server: ServerProcess, log_path: Path) -> list[dict[str, float]]:
    env = {
        **os.environ,
        "TINKER_BASE_URL": server.base_url,
        "TINKER_API_KEY": API_KEY,
        "TINKER_TELEMETRY": "0",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        f"tinker_cookbook.recipes.{recipe}",
        f"model_name={server.model}",
        "renderer_name=role_colon",
        "max_steps=2",
        f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete",
        "eval_every=0",
        "save_every=1",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_chat_sl(tinker_server: ServerProcess, tmp_path: Path) -> None:
    import tinker_cookbook

    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    metrics = _run(
        "chat_sl.train",
        [f"dataset={data}", "batch_size=4", "lora_rank=4", "max_length=256"],
        tinker_server,
        tmp_path / "sl",
    )
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 2 and all(v > 0 for v in nll)


@pytest.mark.skipif(
    not os.environ.get("TREADLE_E2E_FULL"),
    reason="~2 min on 2 cores (10-turn episodes, long prompts); set TREADLE_E2E_FULL=1 to run it",
)
def test_guess_number_rl(tinker_server: ServerProcess, tmp_path: Path) -> None:
    metrics = _run(
        "multiplayer_rl.guess_number.train",
        ["group_size=2", "batch_size=2", "max_tokens=8"],
        tinker_server,
        tmp_path / "rl",
    )
    steps = [m for m in metrics if "optim/kl_sample_train_v1" in m]
    assert len(steps) == 2
    # The sampler's logprobs and the trainer's agree (invariant 1 as the cookbook measures it).
    assert all(abs(m["optim/kl_sample_train_v1"]) < 1e-3 for m in steps)
