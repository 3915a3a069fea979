"""The SQL env on scripted trajectories: execution-match rewards, self-correction metrics, limits, split."""

from __future__ import annotations

import sqlite3

import pytest

from tests.unit.rl.helpers import play, stop_reason, total
from treadle.rl.envs.sql.databases import DOMAINS, database_path, generate_rows, split_domains
from treadle.rl.envs.sql.env import FORMAT_PENALTY, SqlEnv, make_tasks, results_match
from treadle.rl.envs.sql.questions import TEMPLATES, SqlTask
from treadle.rl.sandbox.sqlite_ro import QueryResult


def _task(template: str, level: int = 3) -> SqlTask:
    return next(t for t in make_tasks("train", {"level": level, "seed": 0}) if t.template == template)


def test_databases_deterministic_and_split_by_database() -> None:
    assert generate_rows(DOMAINS["shop"]) == generate_rows(DOMAINS["shop"])
    train = {d.name for d in split_domains("train")}
    test = {d.name for d in split_domains("test")}
    assert train and test and not train & test
    assert {t.database for t in make_tasks("test", {"level": 3, "seed": 0})} == test
    # different schemas and sizes
    assert len({(d.parent.name, d.child.name) for d in DOMAINS.values()}) == len(DOMAINS)
    assert len({d.rows for d in DOMAINS.values()}) == len(DOMAINS)
    conn = sqlite3.connect(database_path("zoo"))
    assert conn.execute("SELECT COUNT(*) FROM animals").fetchone() == (DOMAINS["zoo"].rows[1],)


def test_every_gold_query_runs_and_levels_select_templates() -> None:
    for level in (1, 2, 3):
        tasks = make_tasks("train", {"level": level, "seed": 0}) + make_tasks(
            "test", {"level": level, "seed": 0}
        )
        assert {TEMPLATES[t.template][0] for t in tasks} <= set(range(1, level + 1))
        for task in tasks[::7]:
            env = SqlEnv(task)
            results = play(env, [f"<answer>{task.gold_sql}</answer>"])
            assert total(results) == 1.0, task


def test_self_correction_episode() -> None:
    task = _task("group_count")
    results = play(
        SqlEnv(task),
        ["<sql>SELEC nonsense</sql>", f"<sql>{task.gold_sql}</sql>", f"<answer>{task.gold_sql}</answer>"],
    )
    assert results[0].metrics["query_error"] == 1.0 and "syntax error" in str(
        results[0].next_messages[-1]["content"]
    )
    assert results[1].metrics["rewrite_fixed_error"] == 1.0
    assert results[2].metrics["correct"] == 1.0 and total(results) == 1.0
    assert stop_reason(results) == "completed" and results[-1].metrics["tool_calls"] == 2.0


def test_wrong_and_equivalent_submissions() -> None:
    task = _task("top_k", level=2)
    assert task.ordered
    reversed_order = task.gold_sql.replace("DESC", "ASC")
    assert total(play(SqlEnv(task), [f"<answer>{reversed_order}</answer>"])) == 0.0
    count = _task("count", level=1)
    equivalent = count.gold_sql.replace("COUNT(*)", "COUNT(id) AS n")
    assert total(play(SqlEnv(count), [f"<answer>{equivalent}</answer>"])) == 1.0
    # unordered questions ignore row order
    join = _task("join_filter")
    shuffled = join.gold_sql + " ORDER BY random()"
    assert total(play(SqlEnv(join), [f"<answer>{shuffled}</answer>"])) == 1.0


def test_format_penalty_and_tool_call_limit() -> None:
    task = _task("count", level=1)
    results = play(SqlEnv(task), ["SELECT COUNT(*)", f"<answer>{task.gold_sql}</answer>"])
    assert results[0].reward == FORMAT_PENALTY and total(results) == pytest.approx(1.0 + FORMAT_PENALTY)
    results = play(SqlEnv(task), ["<sql>SELECT 1</sql>"])
    assert len(results) == 5 and stop_reason(results) == "max_tool_calls" and total(results) == 0.0


def test_results_match_rules() -> None:
    a = QueryResult(["x"], [(1,), (2,)])
    assert results_match(QueryResult(["y"], [(2,), (1,)]), a, ordered=False)
    assert not results_match(QueryResult(["y"], [(2,), (1,)]), a, ordered=True)
    assert not results_match(QueryResult(["x", "z"], [(1, 0), (2, 0)]), a, ordered=False)
    assert not results_match(QueryResult(["x"], [(1,), (2,), (2,)]), a, ordered=False)
    assert results_match(QueryResult(["x"], [(1.0,), (2.0000000001,)]), a, ordered=True)
    assert not results_match(QueryResult(error="boom"), a, ordered=False)
