"""The official tinker-cookbook recipes, unmodified, against a real `treadle serve` on the default model.

Each recipe runs as its own CLI entry point (`python -m tinker_cookbook.recipes.…`) in a subprocess that sees only
what a cookbook user would set: `TINKER_BASE_URL`, `TINKER_API_KEY`, `HF_HUB_OFFLINE=1`, and `renderer_name`
(SmolLM2 is not in the cookbook's model table; `qwen3_instruct` renders exactly its `<|im_start|>` chat template).
The tokenizer loads by name because treadle registers it in the Hugging Face cache this session points at.

Runs are tiny (2 steps, a few sequences, a handful of sampled tokens) so CPU-only CI stays within minutes; the
checks are on the recipes' own `metrics.jsonl`: two steps, finite numbers, and for RL that the sampler's
logprobs agree with the trainer's (the cookbook's `kl_sample_train` is ~0 only if both run the same weights).
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

pytestmark = pytest.mark.slow

COOKBOOK_KEY = "tml-cookbook"
# qwen3_instruct = ChatML without thinking tags, token-for-token SmolLM2's own chat template.
RENDERER = "qwen3_instruct"
RECIPE_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # `--model` takes the name: the default model is converted on first use and its tokenizer registered in
    # $HF_HUB_CACHE, which the recipe subprocesses inherit.
    srv = ServerProcess(
        Path(DEFAULT_MODEL), tmp_path_factory.mktemp("cookbook-data") / "server", "--api-key", COOKBOOK_KEY
    )
    srv.start(timeout_s=900)
    try:
        yield srv
    finally:
        srv.stop()


def cookbook_env(server: ServerProcess, runs_dir: Path) -> dict[str, str]:
    """The environment a cookbook user sets to point at treadle (plus offline/quiet switches)."""
    return {
        **os.environ,
        "TINKER_BASE_URL": server.base_url,
        "TINKER_API_KEY": COOKBOOK_KEY,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
        "WANDB_MODE": "disabled",
        "TINKER_COOKBOOK_RUNS_DIR": str(runs_dir),
        "OMP_NUM_THREADS": "1",
    }


def run_recipe(server: ServerProcess, module: str, log_path: Path, *args: str) -> list[dict[str, Any]]:
    """Run `python -m <module> key=value…` to completion; returns its metrics.jsonl rows."""
    cmd = [
        sys.executable,
        "-m",
        module,
        f"model_name={DEFAULT_MODEL}",
        f"renderer_name={RENDERER}",
        "max_steps=2",
        f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete",
        *args,
    ]
    out_path = log_path.parent / f"{log_path.name}.out"
    with open(out_path, "wb") as out:
        proc = subprocess.run(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cookbook_env(server, log_path.parent / "runs"),
            cwd=log_path.parent,
            timeout=RECIPE_TIMEOUT_S,
            check=False,
        )
    output = out_path.read_text(errors="replace")
    assert proc.returncode == 0, (
        f"{module} exited {proc.returncode}:\n{output[-6000:]}\n--- server log ---\n{server.log()}"
    )
    assert "Training completed successfully" in output
    metrics_file = log_path / "metrics.jsonl"
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def assert_two_finite_steps(rows: list[dict[str, Any]], *keys: str) -> None:
    assert [r.get("step") for r in rows] == [0, 1], rows
    for row in rows:
        for key in keys:
            assert key in row, f"{key} missing from step {row['step']}: {sorted(row)}"
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"step {row['step']}: {key} = {value}"


def assert_final_checkpoint(log_path: Path) -> None:
    """The recipe recorded the server's tinker:// paths for its final state and sampler weights."""
    lines = (log_path / "checkpoints.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["name"] == "final"
    assert str(final["state_path"]).startswith("tinker://")
    assert str(final["sampler_path"]).startswith("tinker://")


def assert_sampler_matches_trainer(rows: list[dict[str, Any]]) -> None:
    # kl_sample_train_v1 = mean(sampled logprob − trainer logprob) over sampled tokens: the same weights in both
    # engines leave only float noise; a mismatch (stale weights, off-by-one targets) shows up as O(0.1–1).
    for row in rows:
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3, row
        assert row["optim/entropy"] > 0


def test_math_rl_arithmetic_importance_sampling(server: ServerProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "math_rl"
    rows = run_recipe(
        server,
        "tinker_cookbook.recipes.math_rl.train",
        log_path,
        "env=arithmetic",
        "loss_fn=importance_sampling",
        "group_size=2",
        "groups_per_batch=2",
        "max_tokens=5",
        "lora_rank=8",
        "eval_every=0",
        "save_every=0",
    )
    assert_two_finite_steps(rows, "env/all/reward/total", "optim/kl_sample_train_v1", "optim/entropy")
    for row in rows:
        assert row["env/all/total_episodes"] == 4  # groups_per_batch × group_size rollouts each step
        assert -1.0 <= row["env/all/reward/total"] <= 1.0
    assert_sampler_matches_trainer(rows)
    assert_final_checkpoint(log_path)


def test_chat_sl_bundled_conversations(server: ServerProcess, tmp_path: Path) -> None:
    import tinker_cookbook

    dataset = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    assert dataset.is_file()
    log_path = tmp_path / "chat_sl"
    rows = run_recipe(
        server,
        "tinker_cookbook.recipes.chat_sl.train",
        log_path,
        f"dataset={dataset}",
        "batch_size=4",
        "max_length=256",
        "lora_rank=8",
        "learning_rate=1e-4",
        "eval_every=0",
        "infrequent_eval_every=0",
        "save_every=0",
    )
    assert_two_finite_steps(rows, "train_mean_nll", "num_tokens", "learning_rate")
    for row in rows:
        assert row["num_sequences"] == 4
        # NLL comes from the server's per-token logprobs: positive and far below uniform over the vocab (~10.8).
        assert 0.0 < row["train_mean_nll"] < 8.0
    assert (
        rows[1]["learning_rate"] < rows[0]["learning_rate"]
    )  # the recipe's linear schedule reached the server
    assert_final_checkpoint(log_path)


def test_multiplayer_rl_guess_number(server: ServerProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "guess_number"
    rows = run_recipe(
        server,
        "tinker_cookbook.recipes.multiplayer_rl.guess_number.train",
        log_path,
        "group_size=2",
        "batch_size=1",
        "max_tokens=6",
        "eval_every=0",
        "save_every=0",
    )
    assert_two_finite_steps(
        rows, "env/all/reward/total", "env/all/turns_per_episode", "optim/kl_sample_train_v1"
    )
    for row in rows:
        assert row["env/all/total_episodes"] == 2
        assert 1.0 <= row["env/all/turns_per_episode"] <= 10.0  # the env's MAX_TURNS
    # Multi-turn: later turns are sampled on prompts that extend earlier ones (prefix reuse in the sampler).
    assert_sampler_matches_trainer(rows)
    assert_final_checkpoint(log_path)
