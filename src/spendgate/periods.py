"""Calendar periods of the global budget: a day, an ISO week or a month in one time zone
(docs/reference.md §6).

Pure: the bounds of the period holding a moment, as Unix times. Bounds are local
midnights built from calendar dates, so a period across a daylight-saving change is
23 or 25 hours long, as the user's calendar says.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

TOTAL = "total"
PERIODS = (TOTAL, "day", "week", "month")


class Period(NamedTuple):
    name: str
    """``day``, ``week`` or ``month``."""
    start: float
    end: float
    label: str
    """The period as people write it: ``2026-12-02``, ``2026-W49``, ``2026-12``."""


def _first_day(kind: str, day: date) -> date:
    if kind == "day":
        return day
    if kind == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if kind == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {kind!r}")


def _next_first_day(kind: str, first: date) -> date:
    if kind == "day":
        return first + timedelta(days=1)
    if kind == "week":
        return first + timedelta(days=7)
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


def _label(kind: str, first: date) -> str:
    if kind == "day":
        return first.isoformat()
    if kind == "week":
        year, week, _ = first.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{first.year}-{first.month:02d}"


def period_at(kind: str, zone: str, now: float) -> Period | None:
    """The period of kind ``kind`` holding the Unix time ``now``; None for ``total``."""
    if kind == TOTAL:
        return None
    tz = ZoneInfo(zone)
    first = _first_day(kind, datetime.fromtimestamp(now, tz).date())
    start = datetime.combine(first, time(0), tzinfo=tz).timestamp()
    end = datetime.combine(_next_first_day(kind, first), time(0), tzinfo=tz).timestamp()
    return Period(kind, start, end, _label(kind, first))
