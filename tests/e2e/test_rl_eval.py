"""`treadle rl eval` end to end: the CLI samples N trials per test task through the official SDK from a real
`treadle serve` (tiny random-init model) and writes a pass^k / pass@k report for a tinker:// sampler path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker

from tests.e2e.conftest import API_KEY, ServerProcess
from treadle.cli import main

TRIALS = 3
TASKS = 2


def run_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "treadle.cli", "rl", "eval", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_rl_eval_of_a_sampler_path_writes_pass_k_report(tinker_server: ServerProcess, tmp_path: Path) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4, seed=3).result()
    path = tc.save_weights_for_sampler("rl-eval").result().path
    assert path.startswith("tinker://")

    out = tmp_path / "eval"
    proc = run_cli(
        tinker_server,
        "twenty_questions",
        "level=1",
        "--model",
        path,
        "--trials",
        str(TRIALS),
        "--tasks",
        str(TASKS),
        "--max-tokens",
        "4",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + tinker_server.log()
    doc = json.loads((out / "eval.json").read_text())
    assert doc["model"] == path and doc["split"] == "test"
    assert doc["settings"]["base_model"] == tinker_server.model  # looked up over REST from the tinker:// path
    assert doc["tasks"] == TASKS and doc["trials"] == TRIALS
    assert [t["n"] for t in doc["per_task"]] == [TRIALS] * TASKS
    assert doc["settings"]["errored_trials"] == 0, doc["settings"]
    # every trial ran to an end the env recorded (answer, turn limit or token limit)
    assert sum(doc["settings"]["stop_reasons"].values()) == TASKS * TRIALS
    for name in ("pass^k", "pass@k"):
        assert doc[name]["ks"] == list(range(1, TRIALS + 1))
        assert all(0.0 <= x <= 1.0 for x in doc[name]["mean"])
    assert doc["pass^k"]["mean"][0] == doc["pass@k"]["mean"][0] == doc["pass@1"]
    assert (out / "passk.png").read_bytes()[:4] == b"\x89PNG"
    assert "pass^k" in proc.stdout and f"{TASKS} tasks × {TRIALS} trials" in proc.stdout


def test_rl_eval_bad_input_names_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    # refused before any server is contacted: the same CLI entry point, in-process
    assert main(["rl", "eval", "no_such_env", "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown env 'no_such_env'; registered envs:" in err and "twenty_questions" in err
    assert main(["rl", "eval", "twenty_questions", "level=9"]) == 2
    assert "level='9': allowed values are 1, 2, 3, 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rl", "eval", "twenty_questions", "--trials", "0"])
    assert "--trials: expected a whole number >= 1, got 0" in capsys.readouterr().err
