"""Natural-language questions with gold SQL, from templates over a domain's schema and data.

Templates come in three levels (1: one table, counts and aggregates; 2: filters, grouping, ordering; 3: joins)
and several phrasings each. A question is asked only when its gold answer is unambiguous (e.g. a top-k
question is skipped when the k-th and (k+1)-th values tie).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from treadle.rl.envs.sql.databases import Domain, generate_rows


@dataclass(frozen=True)
class SqlTask:
    database: str
    question: str
    gold_sql: str
    ordered: bool  # the question asks for an order: the result is compared as a list
    template: str
    level: int


Rows = list[tuple]
Template = Callable[[Domain, Rows, Rows, random.Random], tuple[str, str, bool] | None]


def _count(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t = rng.choice((d.parent, d.child))
    q = rng.choice(("How many {p} are there?", "Count the {p}.", "What is the number of {p}?"))
    return q.format(p=t.plural), f"SELECT COUNT(*) FROM {t.name}", False


def _aggregate(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t = rng.choice((d.parent, d.child))
    fn, word = rng.choice((("MAX", "largest"), ("MIN", "smallest"), ("SUM", "total")))
    q = rng.choice(("What is the {w} {c} of all {p}?", "Find the {w} {c} among the {p}."))
    return q.format(w=word, c=t.num_col, p=t.plural), f"SELECT {fn}({t.num_col}) FROM {t.name}", False


def _filter_eq(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t = d.parent
    v = rng.choice(sorted({r[2] for r in parents}))
    q = rng.choice(("List the {n} of {p} whose {c} is '{v}'.", "Which {p} have {c} '{v}'? Give their {n}."))
    sql = f"SELECT {t.name_col} FROM {t.name} WHERE {t.cat_col} = '{v}'"
    return q.format(n=t.name_col, p=t.plural, c=t.cat_col, v=v), sql, False


def _count_greater(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t, rows = rng.choice(((d.parent, parents), (d.child, children)))
    x = int(statistics.median(r[-1] for r in rows)) + rng.randint(-3, 3)
    q = rng.choice(("How many {p} have {c} greater than {x}?", "Count the {p} with {c} above {x}."))
    return (
        q.format(p=t.plural, c=t.num_col, x=x),
        f"SELECT COUNT(*) FROM {t.name} WHERE {t.num_col} > {x}",
        False,
    )


def _group_count(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t = rng.choice((d.parent, d.child))
    q = rng.choice(
        ("For each {c}, how many {p} are there?", "Count the {p} per {c}. Give each {c} and its count.")
    )
    sql = f"SELECT {t.cat_col}, COUNT(*) FROM {t.name} GROUP BY {t.cat_col}"
    return q.format(c=t.cat_col, p=t.plural), sql, False


def _top_k(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool] | None:
    t = d.parent
    k = rng.choice((2, 3))
    values = sorted((r[3] for r in parents), reverse=True)
    if len(set(values[: k + 1])) <= k:  # a tie anywhere in the top k+1 makes the order ambiguous
        return None
    q = rng.choice(
        (
            "Which {k} {p} have the highest {c}? List their {n} from highest to lowest {c}.",
            "Give the {n} of the top {k} {p} by {c}, in descending order of {c}.",
        )
    )
    sql = f"SELECT {t.name_col} FROM {t.name} ORDER BY {t.num_col} DESC LIMIT {k}"
    return q.format(k=k, p=t.plural, c=t.num_col, n=t.name_col), sql, True


def _avg_filter(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    t = d.child
    v = rng.choice(sorted({r[3] for r in children}))
    q = rng.choice(
        ("What is the average {n} of {p} whose {c} is '{v}'?", "Find the mean {n} of the '{v}' {p}.")
    )
    sql = f"SELECT AVG({t.num_col}) FROM {t.name} WHERE {t.cat_col} = '{v}'"
    return q.format(n=t.num_col, p=t.plural, c=t.cat_col, v=v), sql, False


def _join_filter(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    p, c = d.parent, d.child
    v = rng.choice(sorted({r[2] for r in parents}))
    q = rng.choice(
        (
            "List the {cn} of all {cp} whose {ps} has {pc} '{v}'.",
            "Which {cn} values appear among {cp} of {pp} with {pc} '{v}'? List one row per {cs}.",
        )
    )
    sql = f"SELECT {c.name}.{c.name_col} FROM {c.name} JOIN {p.name} ON {c.name}.{d.fk} = {p.name}.id WHERE {p.name}.{p.cat_col} = '{v}'"
    return (
        q.format(cn=c.name_col, cp=c.plural, cs=c.singular, ps=p.singular, pp=p.plural, pc=p.cat_col, v=v),
        sql,
        False,
    )


def _join_count_named(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    p, c = d.parent, d.child
    name = rng.choice(parents)[1]
    q = rng.choice(("How many {cp} does the {ps} named '{n}' have?", "Count the {cp} of {ps} '{n}'."))
    sql = f"SELECT COUNT(*) FROM {c.name} JOIN {p.name} ON {c.name}.{d.fk} = {p.name}.id WHERE {p.name}.{p.name_col} = '{name}'"
    return q.format(cp=c.plural, ps=p.singular, n=name), sql, False


def _join_group_sum(d: Domain, parents: Rows, children: Rows, rng: random.Random) -> tuple[str, str, bool]:
    p, c = d.parent, d.child
    q = rng.choice(
        (
            "For each {ps} that has {cp}, give the {ps}'s {pn} and the total {cn} of their {cp}.",
            "Show every {ps} {pn} with the sum of {cn} over their {cp} (only {pp} with at least one).",
        )
    )
    sql = (
        f"SELECT {p.name}.{p.name_col}, SUM({c.name}.{c.num_col}) FROM {p.name} JOIN {c.name} "
        f"ON {c.name}.{d.fk} = {p.name}.id GROUP BY {p.name}.id"
    )
    return q.format(ps=p.singular, pp=p.plural, pn=p.name_col, cn=c.num_col, cp=c.plural), sql, False


TEMPLATES: dict[str, tuple[int, Template]] = {
    "count": (1, _count),
    "aggregate": (1, _aggregate),
    "filter_eq": (1, _filter_eq),
    "count_greater": (2, _count_greater),
    "group_count": (2, _group_count),
    "top_k": (2, _top_k),
    "avg_filter": (2, _avg_filter),
    "join_filter": (3, _join_filter),
    "join_count_named": (3, _join_count_named),
    "join_group_sum": (3, _join_group_sum),
}


def generate_questions(domain: Domain, level: int, count: int, seed: int) -> list[SqlTask]:
    """`count` questions on one database using templates up to `level`, deterministic in (domain, level, seed)."""
    rng = random.Random(f"sql-questions/{domain.name}/{level}/{seed}")
    parents, children = generate_rows(domain)
    names = sorted(n for n, (lv, _) in TEMPLATES.items() if lv <= level)
    tasks: list[SqlTask] = []
    while len(tasks) < count:
        name = rng.choice(names)
        made = TEMPLATES[name][1](domain, parents, children, rng)
        if made is not None:
            question, sql, ordered = made
            tasks.append(SqlTask(domain.name, question, sql, ordered, name, TEMPLATES[name][0]))
    return tasks
