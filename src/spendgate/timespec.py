"""Moments as people write them, and as the exports show them (docs/reference.md §8, §11).

Pure. ``--since`` / ``--until`` / ``--before`` and the API's ``since``, ``until`` and
``before`` take an ISO date (``2026-12-01``: that day's UTC midnight), an ISO datetime
(``2026-12-01T13:00``, ``…Z`` or ``…+02:00``; without an offset, UTC) or a duration
back from now (``90m``, ``12h``, ``7d``, ``2w``). An ``until`` given as a date takes in
that whole day. Every bound is a Unix time; exports show times as ISO-8601 UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

DURATION = re.compile(r"(\d{1,6})\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
LONGEST_S = 100 * 366 * 86400
"""A duration longer than a century is a mistake, not a report."""
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)
MAX_TEXT = 64
"""Longer input is refused before it is parsed."""


class TimeSpecError(ValueError):
    """A moment that cannot be read; the message says what is accepted."""


def _refused(text: str, name: str) -> TimeSpecError:
    shown = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"
    return TimeSpecError(
        f"{name} {shown!r} is not a date (2026-12-01), a datetime (2026-12-01T13:00Z) "
        "or a duration back from now (90m, 12h, 7d, 2w)"
    )


def parse(text: str, now: float, name: str = "time", end_of_day: bool = False) -> float:
    """``text`` as a Unix time. ``end_of_day``: a bare date means the midnight after it
    (an exclusive ``until`` that takes in the whole day)."""
    raw = text.strip()
    if not raw or len(raw) > MAX_TEXT:
        raise _refused(text, name)
    m = DURATION.fullmatch(raw.lower())
    if m is not None:
        seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
        if seconds > LONGEST_S:
            raise TimeSpecError(f"{name} {raw!r} is longer than a century")
        return now - seconds
    try:
        if len(raw) == 10:  # a date alone
            day = date.fromisoformat(raw)
            if end_of_day:
                day += timedelta(days=1)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(raw)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise _refused(text, name) from None
    if not EARLIEST <= moment <= LATEST:
        raise TimeSpecError(f"{name} {raw!r} is outside the years 1970 to 9999")
    return moment.timestamp()


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC to the millisecond: ``2026-12-01T13:05:09.250Z``."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_bound(ts: float | None) -> str | None:
    """A report's bound as ISO-8601 UTC to the second (``2026-12-01T00:00:00Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
