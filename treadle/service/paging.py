"""Paging of list routes: one check of `limit` and `offset`, so a list never reaches the store with a page
it cannot hold (an offset past int64 overflowed SQLite's INTEGER and answered 500)."""

from __future__ import annotations

from treadle.errors import require

MAX_PAGE = 10_000
MAX_OFFSET = 2**63 - 1  # the store's integers are int64


def check_page(limit: int, offset: int, max_limit: int = MAX_PAGE) -> None:
    require(1 <= limit <= max_limit, "limit", f"must be in 1..{max_limit}, got {limit}")
    require(0 <= offset <= MAX_OFFSET, "offset", f"must be in 0..{MAX_OFFSET}, got {offset}")
