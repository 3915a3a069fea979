"""The SQL env: write a query, see its result table or error, rewrite, then submit; graded by execution match.

Turns: `<sql>QUERY</sql>` runs a read-only query (counts as a tool call) and shows the result; `<answer>QUERY
</answer>` submits and ends the episode. Reward: 1 if the submitted query's result equals the gold query's
(as a multiset of rows, or as a list when the question asks for an order; column names ignored, numbers
compared to 1e-6), else 0; each turn with neither tag costs FORMAT_PENALTY. Metrics per turn record query
errors and whether a rewrite fixed the previous error.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import chz
from tinker_cookbook.renderers import Message
from tinker_cookbook.rl.types import StopReason

from treadle.rl.envs.dataset import TreadleEnvDatasetBuilder
from treadle.rl.envs.episode import Turn, TurnEnv
from treadle.rl.envs.spec import DEMO_KEY, ConfigKey, EnvLimits, EnvSpec, seed_key
from treadle.rl.envs.sql.databases import DOMAINS, database_path, schema_sql, split_domains
from treadle.rl.envs.sql.questions import SqlTask, generate_questions
from treadle.rl.sandbox.sqlite_ro import QueryResult, ReadOnlySqlite

LIMITS = EnvLimits(
    max_turns=5,
    max_tokens_per_turn=160,
    max_trajectory_tokens=4096,
    max_tool_calls=4,
    tool_timeout_s=2.0,
    episode_timeout_s=120.0,
)
QUESTIONS_PER_DATABASE = 60
FORMAT_PENALTY = -0.1
SHOWN_ROWS = 10
GRADE_MAX_ROWS = 10_000

SYSTEM_PROMPT = (
    "You answer questions about a SQLite database by writing SQL. To run a query and see its result, write "
    "<sql>SELECT ...</sql>. When your query is right, submit it as <answer>SELECT ...</answer>. "
    "Only single SELECT statements are allowed.\n"
    "Example: for 'How many pets are there?' reply <answer>SELECT COUNT(*) FROM pets</answer>"
)
DEMO: list[Message] = [
    {
        "role": "user",
        "content": "Database schema:\nCREATE TABLE pets (id INTEGER PRIMARY KEY, name TEXT, kind TEXT, age INTEGER);"
        "\n\nQuestion: How many pets are there?",
    },
    {"role": "assistant", "content": "<sql>SELECT COUNT(*) FROM pets</sql>"},
    {"role": "user", "content": "COUNT(*)\n7\n(1 rows)"},
    {"role": "assistant", "content": "<answer>SELECT COUNT(*) FROM pets</answer>"},
    {"role": "user", "content": "Correct."},
]
_SQL = re.compile(r"<sql>(.*?)</sql>", re.S | re.I)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


def make_tasks(split: str, config: dict[str, Any]) -> list[SqlTask]:
    tasks: list[SqlTask] = []
    for domain in split_domains(split):
        tasks += generate_questions(domain, int(config["level"]), QUESTIONS_PER_DATABASE, int(config["seed"]))
    return tasks


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        return round(value, 6)
    return value


def results_match(submitted: QueryResult, gold: QueryResult, ordered: bool) -> bool:
    """Execution match: same rows (order-insensitive unless `ordered`), same width; column names ignored."""
    if submitted.error is not None or gold.error is not None or submitted.truncated or gold.truncated:
        return False
    if len(submitted.columns) != len(gold.columns):
        return False
    got = [tuple(_normalise(v) for v in row) for row in submitted.rows]
    want = [tuple(_normalise(v) for v in row) for row in gold.rows]
    return got == want if ordered else Counter(got) == Counter(want)


class SqlEnv(TurnEnv):
    def __init__(self, task: SqlTask, limits: EnvLimits = LIMITS, demo: bool = False) -> None:
        prompt = f"Database schema:\n{schema_sql(DOMAINS[task.database])}\n\nQuestion: {task.question}"
        super().__init__(SYSTEM_PROMPT, prompt, limits, DEMO if demo else None)
        self.task = task
        self.last_query_failed = False
        self.correct = False

    def _conn(self, max_rows: int) -> ReadOnlySqlite:
        return ReadOnlySqlite(
            database_path(self.task.database), timeout_s=self.limits.tool_timeout_s, max_rows=max_rows
        )

    async def _run(self, sql: str, max_rows: int = GRADE_MAX_ROWS) -> QueryResult:
        def go() -> QueryResult:
            conn = self._conn(max_rows)
            try:
                return conn.execute(sql)
            finally:
                conn.close()

        return await asyncio.to_thread(go)

    async def respond(self, text: str) -> Turn:
        answer = _ANSWER.search(text)
        if answer:
            return await self._submit(answer.group(1).strip())
        query = _SQL.search(text)
        if query:
            if self.tool_calls >= self.limits.max_tool_calls:
                return Turn(0.0, "Query limit reached.", done=True, stop_reason=StopReason.MAX_TOOL_CALLS)
            return await self._query(query.group(1).strip())
        return Turn(
            FORMAT_PENALTY,
            "Write <sql>QUERY</sql> to run a query, or <answer>QUERY</answer> to submit.",
            metrics={"format_error": 1},
        )

    async def _query(self, sql: str) -> Turn:
        result = await self._run(sql, max_rows=SHOWN_ROWS)
        metrics = {"query_error": float(result.error is not None)}
        if self.last_query_failed:
            metrics["rewrite_fixed_error"] = float(result.error is None)
        self.last_query_failed = result.error is not None
        return Turn(0.0, result.render(max_rows=SHOWN_ROWS), tool_calls=1, metrics=metrics)

    async def _submit(self, sql: str) -> Turn:
        submitted = await self._run(sql)
        gold = await self._run(self.task.gold_sql)
        assert gold.error is None, f"gold query failed: {self.task.gold_sql}: {gold.error}"
        self.correct = results_match(submitted, gold, self.task.ordered)
        metrics = {"correct": float(self.correct), "submitted_error": float(submitted.error is not None)}
        if self.last_query_failed:
            metrics["rewrite_fixed_error"] = float(submitted.error is None)
        reply = "Correct." if self.correct else "Incorrect."
        return Turn(float(self.correct), reply, done=True, metrics=metrics)


SPEC = EnvSpec(
    name="sql",
    limits=LIMITS,
    tools=("sql_query",),
    config_keys=(
        ConfigKey(
            "level",
            1,
            "question templates: 1 single-table, 2 +filters/grouping/order, 3 +joins",
            choices=(1, 2, 3),
        ),
        seed_key("question"),
        DEMO_KEY,
    ),
    make_tasks=make_tasks,
    make_env=lambda task, config: SqlEnv(task, demo=bool(config.get("demo", 0))),
)


@chz.chz
class SqlDatasetBuilder(TreadleEnvDatasetBuilder):
    """`rl.train` dataset builder for the SQL env (`env_config={"level": 1..3}`)."""

    env_name: str = "sql"
