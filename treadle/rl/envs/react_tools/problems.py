"""Generated multi-step arithmetic word problems with exact integer answers, at three levels.

Level 1: one operation on two-digit numbers. Level 2: two operations. Level 3: three or four operations on
larger numbers (multiplications a tool makes easy). Every answer is a non-negative integer and every division
is exact by construction. Train and test come from different seeds; a test question that also occurs in train
is dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class WordProblem:
    question: str
    answer: int
    level: int
    template: str


Maker = Callable[[random.Random], tuple[str, int]]
_NAMES = ("Mia", "Ravi", "Lena", "Tomas", "Aiko", "Omar", "Zoe", "Kofi")


def _sum(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"One shelf holds {a} books and another holds {b} books. How many books are there in total?", a + b


def _difference(r: random.Random) -> tuple[str, int]:
    a = r.randint(50, 99)
    b = r.randint(10, a - 1)
    return f"A tank holds {a} liters of water and {b} liters leak out. How many liters are left?", a - b


def _product(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(3, 30), r.randint(3, 30)
    return f"{r.choice(_NAMES)} buys {a} boxes with {b} pens in each box. How many pens is that?", a * b


def _share(r: random.Random) -> tuple[str, int]:
    k, each = r.randint(2, 12), r.randint(2, 20)
    return (
        f"{k * each} candies are shared equally among {k} children. How many candies does each child get?",
        each,
    )


def _sell_rest(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(5, 40), r.randint(5, 40)
    c = r.randint(1, a * b - 1)
    q = f"A farmer has {a} crates with {b} apples in each. He sells {c} apples. How many apples are left?"
    return q, a * b - c


def _bus(r: random.Random) -> tuple[str, int]:
    a = r.randint(20, 90)
    b, c = r.randint(1, a), r.randint(1, 60)
    q = f"A bus has {a} passengers. At the next stop {b} get off and {c} get on. How many passengers are on the bus now?"
    return q, a - b + c


def _change(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 15), r.randint(2, 40)
    c = a * b + r.randint(0, 100)
    name = r.choice(_NAMES)
    q = f"{name} buys {a} notebooks at {b} dollars each and pays with {c} dollars. How much change does {name} get?"
    return q, c - a * b


def _full_boxes(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(10, 60), r.randint(2, 12), r.randint(3, 24)
    q = f"A machine makes {a} toys per hour for {b} hours. The toys are packed in boxes of {c}. How many boxes can be filled completely?"
    return q, (a * b) // c


def _order_total(r: random.Random) -> tuple[str, int]:
    a, b, c, d = r.randint(12, 99), r.randint(101, 999), r.randint(12, 99), r.randint(101, 999)
    e = r.randint(1, 500)
    q = (
        f"A school orders {a} desks at {b} dollars each and {c} chairs at {d} dollars each, and gets a discount "
        f"of {e} dollars. What is the total cost in dollars?"
    )
    return q, a * b + c * d - e


def _warehouse(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(20, 90), r.randint(24, 144)
    total = a * b
    c, d = r.randint(1, total // 3), r.randint(1, total // 3)
    shelves = r.randint(2, 12)
    d += (total - c - d) % shelves  # ship a few more cans so the rest splits exactly
    rest = total - c - d
    q = (
        f"A warehouse receives {a} pallets of {b} cans. It ships {c} cans on Monday and {d} cans on Tuesday, then "
        f"splits the remaining cans equally onto {shelves} shelves. How many cans go on each shelf?"
    )
    return q, rest // shelves


def _savings(r: random.Random) -> tuple[str, int]:
    a, w, b, c = r.randint(100, 999), r.randint(12, 52), r.randint(10, 99), r.randint(100, 2000)
    name = r.choice(_NAMES)
    total = a + w * b
    c = min(c, total)
    q = (
        f"{name} has {a} dollars, saves {b} dollars every week for {w} weeks, then spends {c} dollars on a bike. "
        f"How many dollars does {name} have now?"
    )
    return q, total - c


TEMPLATES: dict[str, tuple[int, Maker]] = {
    "sum": (1, _sum),
    "difference": (1, _difference),
    "product": (1, _product),
    "share": (1, _share),
    "sell_rest": (2, _sell_rest),
    "bus": (2, _bus),
    "change": (2, _change),
    "full_boxes": (2, _full_boxes),
    "order_total": (3, _order_total),
    "warehouse": (3, _warehouse),
    "savings": (3, _savings),
}
PROBLEMS_PER_SPLIT = {"train": 1000, "test": 200}


def _generate(split: str, level: int, seed: int, count: int) -> list[WordProblem]:
    rng = random.Random(f"react/{split}/{level}/{seed}")
    names = sorted(n for n, (lv, _) in TEMPLATES.items() if lv == level)
    out = []
    for _ in range(count):
        name = rng.choice(names)
        question, answer = TEMPLATES[name][1](rng)
        out.append(WordProblem(question, answer, level, name))
    return out


def make_problems(split: str, level: int, seed: int) -> list[WordProblem]:
    if split == "train":
        return _generate("train", level, seed, PROBLEMS_PER_SPLIT["train"])
    seen = {p.question for p in _generate("train", level, seed, PROBLEMS_PER_SPLIT["train"])}
    rng_seed, out = seed, []
    while len(out) < PROBLEMS_PER_SPLIT["test"]:
        out += [
            p
            for p in _generate("test", level, rng_seed, PROBLEMS_PER_SPLIT["test"])
            if p.question not in seen
        ]
        rng_seed += 10_000
    return out[: PROBLEMS_PER_SPLIT["test"]]
