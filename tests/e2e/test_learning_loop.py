"""The learning loop end to end, short: simulated users (openai client + /v1/feedback) → traces → `Learner`
cycles through the official SDK → promote, automatic rollback, and a rejected candidate that changes nothing,
against a real `treadle serve` subprocess (the tiny model; the full demonstration on the default model is
scripts/learning_loop_demo.py, results in results/deployed-loop.md)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.conftest import API_KEY, ServerProcess
from treadle.errors import UserError
from treadle.learn.config import LearnConfig
from treadle.learn.learner import Learner
from treadle.learn.rest import DeploymentsClient
from treadle.learn.rewards import make_reward_fn
from treadle.learn.simulate import UserPopulation

pytestmark = pytest.mark.slow


def _base_model(server: ServerProcess) -> str:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
    return next(m.id for m in client.models.list().data if m.owned_by != "deployment")


def test_learner_promotes_rolls_back_and_rejects_without_touching_what_is_served(
    tinker_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"loop-{uuid.uuid4().hex[:8]}"
    rest = DeploymentsClient(tinker_server.base_url, API_KEY)
    base = _base_model(tinker_server)
    rest.create_deployment(name, base)
    gate = tmp_path / "gate.jsonl"
    gate.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Capital of Peru?"}], "completion": "Lima."})
        + "\n"
    )
    users = UserPopulation(
        tinker_server.base_url, API_KEY, name, seed=1, correction_rate=1.0, max_tokens=6, concurrency=4
    )
    state_file = tmp_path / "learn.json"
    cfg = LearnConfig(
        deployment=name,
        base_url=tinker_server.base_url,
        api_key=API_KEY,
        state_file=str(state_file),
        min_traces=6,
        max_traces=6,
        poll_interval_s=0.2,
        feedback_wait_s=2.0,
        cycle_timeout_s=30.0,
        gate_set=str(gate),
        gate_tolerance=100.0,
        learning_rate=1e-3,
        rollback_min_feedback=3,
    )
    learner = Learner(cfg, log=lambda _m: None)
    learner.start()

    # cycle 1: the base version's rated traces → a candidate that passes the gate → promoted as version 2
    first = users.round(6)
    assert {i.version for i in first} == {1}
    d1 = learner.run_cycle()
    assert d1.kind == "promote", d1
    assert d1.numbers["traces"] == 6 and d1.numbers["sft_datums"] == sum(i.corrected for i in first)
    dep = rest.get_deployment(name)
    assert (dep["version"], dep["model_path"]) == (2, d1.model_path)
    assert dep["history"][-1]["reason"].startswith("learn cycle 1")
    trace = rest.get_trace(first[0].completion_id)
    assert trace["version"] == 1 and trace["feedback"][0]["reward"] == first[0].reward

    # cycle 2: version 2's users are unhappy (their reward, overridden to -1, is below version 1's)
    second = users.round(6)
    assert {i.version for i in second} == {2}
    for i in second:
        rest.feedback(i.completion_id, reward=-1.0)
    d2 = learner.run_cycle()
    assert d2.kind == "rollback", d2
    dep = rest.get_deployment(name)
    assert (dep["version"], dep["model_path"]) == (3, base)
    assert "rollback" in dep["history"][-1]["reason"]

    # cycle 3: a candidate wrecked by a huge step fails the gate: nothing served changes
    third = users.round(6)
    assert {i.version for i in third} == {3}
    learner.cfg.learning_rate = 1.0
    learner.cfg.gate_tolerance = 0.01
    d3 = learner.run_cycle()
    assert d3.kind == "reject", d3
    cand, live = d3.numbers["gate"], d3.numbers["live_gate"]
    assert isinstance(cand, float) and isinstance(live, float) and cand < live - 0.01
    assert rest.get_deployment(name)["version"] == 3

    from treadle.cli import main

    # the CLI learner resumes from the state file (cursor kept: nothing is trained twice) and skips an idle cycle
    common = [f"state_file={state_file}", f"base_url={tinker_server.base_url}", f"api_key={API_KEY}"]
    argv = ["learn", "--deployment", name, *common, "cycles=1", "cycle_timeout_s=0.5", "poll_interval_s=0.1"]
    assert main(argv) == 0
    assert rest.get_deployment(name)["version"] == 3
    assert {i.version for i in users.round(2)} == {3}
    assert main(["learn", "status", "--deployment", name, *common]) == 0
    out = capsys.readouterr().out
    for kind in ("start", "promote", "rollback", "reject", "skip"):
        assert kind in out
    users.close()
    rest.close()


def test_reward_model_is_a_deployment_on_the_same_server(tinker_server: ServerProcess) -> None:
    rest = DeploymentsClient(tinker_server.base_url, API_KEY)
    base = _base_model(tinker_server)
    judge, agent = f"judge-{uuid.uuid4().hex[:8]}", f"agent-{uuid.uuid4().hex[:8]}"
    rest.create_deployment(judge, base)
    rest.create_deployment(agent, base)
    client = OpenAI(base_url=f"{tinker_server.base_url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model=agent, messages=[{"role": "user", "content": "Capital of Peru?"}], max_tokens=4
    )
    score = make_reward_fn(f"model:{judge}", tinker_server.base_url, API_KEY)(rest.get_trace(reply.id))
    assert score is None or 0.0 <= score <= 1.0  # a random tiny judge may not answer with a number
    (asked,), _ = rest.list_traces(judge)
    assert "Capital of Peru?" in asked["request"]["messages"][0]["content"]
    assert asked["request"]["messages"][0]["content"].startswith("Rate how well")
    with pytest.raises(UserError, match="reward: the reward model deployment 'missing'"):
        make_reward_fn("model:missing", tinker_server.base_url, API_KEY)(rest.get_trace(reply.id))
    rest.close()
