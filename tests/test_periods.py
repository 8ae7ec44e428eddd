"""Calendar periods of the global budget (docs/reference.md §6)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from spendgate.periods import period_at

PARIS = ZoneInfo("Europe/Paris")


def at(*args: int, tz: ZoneInfo = PARIS) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


@pytest.mark.parametrize(
    ("kind", "moment", "start", "end", "label"),
    [
        ("day", (2026, 12, 2, 23, 59), (2026, 12, 2), (2026, 12, 3), "2026-12-02"),
        ("week", (2026, 12, 2, 12, 0), (2026, 11, 30), (2026, 12, 7), "2026-W49"),
        ("month", (2026, 12, 31, 23, 0), (2026, 12, 1), (2027, 1, 1), "2026-12"),
        ("month", (2028, 2, 29, 1, 0), (2028, 2, 1), (2028, 3, 1), "2028-02"),
        ("week", (2027, 1, 1, 0, 0), (2026, 12, 28), (2027, 1, 4), "2026-W53"),
    ],
)
def test_bounds_are_local_midnights(
    kind: str, moment: tuple[int, ...], start: tuple[int, ...], end: tuple[int, ...], label: str
) -> None:
    p = period_at(kind, "Europe/Paris", at(*moment))
    assert p is not None
    assert (p.start, p.end, p.label) == (at(*start), at(*end), label)


def test_a_day_across_a_clock_change_is_as_long_as_the_calendar_says() -> None:
    spring = period_at("day", "Europe/Paris", at(2026, 3, 29, 12, 0))
    autumn = period_at("day", "Europe/Paris", at(2026, 10, 25, 12, 0))
    assert spring is not None and autumn is not None
    assert spring.end - spring.start == 23 * 3600
    assert autumn.end - autumn.start == 25 * 3600


def test_total_has_no_period_and_the_end_belongs_to_the_next() -> None:
    assert period_at("total", "UTC", 0.0) is None
    p = period_at("day", "UTC", 86400.0)
    assert p is not None and p.start == 86400.0 and p.label == "1970-01-02"
