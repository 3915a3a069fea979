"""Generated SQLite databases: six domains, each a parent table and a child table with a foreign key.

Rows come from a seeded generator, so every machine builds byte-for-byte the same data; the files are
written once per process into a cache directory (atomically) and only ever opened read-only after that.
Train and test use different databases (different schemas and sizes): the split is by database.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_VERSION = 1


@dataclass(frozen=True)
class Table:
    name: str
    singular: str
    plural: str
    name_col: str  # text column: unique person-like names in a parent table, labels in a child table
    cat_col: str
    cat_values: tuple[str, ...]
    num_col: str
    num_range: tuple[int, int]
    labels: tuple[str, ...] = ()  # child name values (empty: generated unique names)


@dataclass(frozen=True)
class Domain:
    name: str
    parent: Table
    child: Table
    fk: str  # child column referencing parent.id
    rows: tuple[int, int]  # (parent rows, child rows)
    split: str


_CITIES = ("Oslo", "Lima", "Perth", "Quito", "Riga", "Tunis", "Accra", "Hanoi")
DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "shop",
            Table("customers", "customer", "customers", "name", "city", _CITIES[:5], "age", (18, 80)),
            Table(
                "orders",
                "order",
                "orders",
                "product",
                "status",
                ("paid", "shipped", "returned"),
                "amount",
                (5, 500),
                ("lamp", "chair", "desk", "mug", "rug", "clock"),
            ),
            "customer_id",
            (12, 60),
            "train",
        ),
        Domain(
            "school",
            Table(
                "students", "student", "students", "name", "house", ("red", "blue", "gold"), "grade", (1, 12)
            ),
            Table(
                "exams",
                "exam",
                "exams",
                "subject",
                "term",
                ("spring", "autumn"),
                "score",
                (0, 100),
                ("math", "art", "history", "biology", "music"),
            ),
            "student_id",
            (20, 90),
            "train",
        ),
        Domain(
            "library",
            Table(
                "authors",
                "author",
                "authors",
                "name",
                "country",
                ("Peru", "Chile", "Ghana", "Laos"),
                "born",
                (1900, 1990),
            ),
            Table(
                "books",
                "book",
                "books",
                "title",
                "genre",
                ("poetry", "crime", "travel", "science"),
                "pages",
                (80, 900),
                ("Rivers", "Echoes", "Maps", "Salt", "Lanterns", "Orbits", "Tides"),
            ),
            "author_id",
            (8, 40),
            "train",
        ),
        Domain(
            "fleet",
            Table("drivers", "driver", "drivers", "name", "city", _CITIES[2:7], "age", (21, 65)),
            Table(
                "trips",
                "trip",
                "trips",
                "vehicle",
                "kind",
                ("day", "night"),
                "distance",
                (1, 300),
                ("van", "truck", "bus", "taxi"),
            ),
            "driver_id",
            (25, 120),
            "train",
        ),
        Domain(
            "clinic",
            Table(
                "doctors",
                "doctor",
                "doctors",
                "name",
                "specialty",
                ("heart", "skin", "bones"),
                "experience",
                (1, 40),
            ),
            Table(
                "patients",
                "patient",
                "patients",
                "ward",
                "status",
                ("admitted", "discharged"),
                "age",
                (1, 95),
                ("north", "south", "east", "west"),
            ),
            "doctor_id",
            (10, 50),
            "test",
        ),
        Domain(
            "zoo",
            Table("keepers", "keeper", "keepers", "name", "shift", ("morning", "evening"), "age", (20, 70)),
            Table(
                "animals",
                "animal",
                "animals",
                "species",
                "diet",
                ("plants", "meat", "fish"),
                "weight",
                (1, 900),
                ("otter", "lynx", "heron", "tapir", "okapi", "ibis"),
            ),
            "keeper_id",
            (15, 70),
            "test",
        ),
    )
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


def _unique_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def generate_rows(domain: Domain) -> tuple[list[tuple], list[tuple]]:
    """(parent rows, child rows) for a domain: deterministic from the domain's name and DATA_VERSION."""
    rng = random.Random(f"sql/{DATA_VERSION}/{domain.name}")
    p, c = domain.parent, domain.child
    n_parent, n_child = domain.rows
    parents = [
        (i + 1, name, rng.choice(p.cat_values), rng.randint(*p.num_range))
        for i, name in enumerate(_unique_names(rng, n_parent))
    ]
    children = [
        (
            j + 1,
            rng.randint(1, n_parent),
            rng.choice(c.labels),
            rng.choice(c.cat_values),
            rng.randint(*c.num_range),
        )
        for j in range(n_child)
    ]
    return parents, children


def schema_sql(domain: Domain) -> str:
    p, c = domain.parent, domain.child
    return (
        f"CREATE TABLE {p.name} (id INTEGER PRIMARY KEY, {p.name_col} TEXT, {p.cat_col} TEXT, "
        f"{p.num_col} INTEGER);\n"
        f"CREATE TABLE {c.name} (id INTEGER PRIMARY KEY, {domain.fk} INTEGER REFERENCES {p.name}(id), "
        f"{c.name_col} TEXT, {c.cat_col} TEXT, {c.num_col} INTEGER);"
    )


def _cache_dir() -> Path:
    base = os.environ.get("TREADLE_RL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"treadle-rl-{os.getuid()}"
    )
    path = Path(base) / f"sql-v{DATA_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def database_path(name: str) -> Path:
    """The domain's SQLite file, written once (to a temp name, then renamed) and read-only afterwards."""
    domain = DOMAINS[name]
    path = _cache_dir() / f"{name}.sqlite"
    if path.exists():
        return path
    parents, children = generate_rows(domain)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    conn = sqlite3.connect(tmp)
    conn.executescript(schema_sql(domain))
    conn.executemany(f"INSERT INTO {domain.parent.name} VALUES (?, ?, ?, ?)", parents)
    conn.executemany(f"INSERT INTO {domain.child.name} VALUES (?, ?, ?, ?, ?)", children)
    conn.commit()
    conn.close()
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)
    return path


def split_domains(split: str) -> list[Domain]:
    return [d for d in DOMAINS.values() if d.split == split]
