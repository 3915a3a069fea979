"""List routes refuse pages the store cannot hold (found by the route fuzz: an offset past int64 answered 500
with SQLite's OverflowError) with a 400 naming the field."""

from __future__ import annotations

import pytest

from treadle.errors import UserError
from treadle.service.paging import MAX_OFFSET, check_page


@pytest.mark.parametrize(
    ("limit", "offset", "field"),
    [
        (0, 0, "limit"),
        (10_001, 0, "limit"),
        (20, -1, "offset"),
        (20, MAX_OFFSET + 1, "offset"),
        (20, 10**20, "offset"),
    ],
)
def test_bad_pages_name_the_field(limit: int, offset: int, field: str) -> None:
    with pytest.raises(UserError) as e:
        check_page(limit, offset)
    assert e.value.field == field and field in e.value.message


def test_edges_are_accepted() -> None:
    check_page(1, 0)
    check_page(10_000, MAX_OFFSET)
