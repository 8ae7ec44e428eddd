"""``reports.py`` over time: ``GET /api/report`` through the running proxy, aggregated by
its real SQLite store (docs/reference.md §8), and the time forms of ``timespec.py``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from spendgate.store import SQLiteStore
from spendgate.timespec import TimeSpecError, iso, parse
from tests.conftest import Proxy, StartProxy
from tests.helpers.records import message


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


ROWS = [  # (when, session, agent, model, input, output, cost)
    ("2024-12-29T23:59:59", "a", None, "gpt-4o", 10, 1, "0.1"),  # a Sunday: 2024-W52
    ("2024-12-30T00:00:00", "a", "coder", "gpt-4o", 20, 2, "0.1"),  # Monday: 2025-W01
    ("2026-11-30T23:59:59.999", "b", None, "gpt-4o", 30, 3, "0.1"),  # 2026-W49
    ("2026-12-01T00:00:00", "b", "coder", "mystery", 40, 4, None),  # unpriced
    ("2026-12-01T13:30:00", "b", None, None, 50, 5, None),  # no model, unpriced
    ("2026-12-01T13:59:59", "c", None, "gpt-4o", 60, 6, "0.2"),
    ("2027-01-01T08:00:00", "c", None, "gpt-4o", 70, 7, "0.000000001"),  # Friday: 2026-W53
]


async def seeded(proxy: Proxy) -> Proxy:
    for i, (when, sid, agent, model, inp, out, cost) in enumerate(ROWS):
        proxy.store.add_message(
            message(
                id=f"msg_{i}", session_id=sid, agent_id=agent, model=model, input_tokens=inp,
                output_tokens=out, cached_input_tokens=inp // 10, started_at=at(when),
                cost_usd=None if cost is None else Decimal(cost),
            )
        )  # fmt: skip
    return proxy


async def report(proxy: Proxy, **query: str) -> Any:
    return await proxy.get_json("/api/report", params=query)


async def test_by_day_is_the_default_with_the_agreed_shape(proxy: Proxy) -> None:
    r = await report(await seeded(proxy))
    assert r["by"] == "day" and r["timezone"] == "UTC"
    assert r["since"] is None and r["until"] is None
    keys = [row["key"] for row in r["rows"]]
    assert keys == ["2024-12-29", "2024-12-30", "2026-11-30", "2026-12-01", "2027-01-01"]
    dec1 = r["rows"][3]
    assert dec1 == {
        "key": "2026-12-01", "messageCount": 3, "inputTokens": 150, "outputTokens": 15,
        "cachedInputTokens": 15, "costUsd": 0.2, "unpricedMessageCount": 2,
    }  # fmt: skip
    assert r["total"] == {
        "messageCount": 7, "inputTokens": 280, "outputTokens": 28, "cachedInputTokens": 28,
        "costUsd": 0.500000001, "unpricedMessageCount": 2,
    }  # fmt: skip


async def test_hour_week_and_month_keys_in_utc(proxy: Proxy) -> None:
    await seeded(proxy)
    hours = {row["key"]: row["messageCount"] for row in (await report(proxy, by="hour"))["rows"]}
    assert hours["2026-12-01T13:00Z"] == 2 and hours["2026-12-01T00:00Z"] == 1
    assert "2026-11-30T23:00Z" in hours
    weeks = [(row["key"], row["messageCount"]) for row in (await report(proxy, by="week"))["rows"]]
    # ISO weeks: the Sunday before 2024-12-30 is in 2024-W52, that Monday in 2025-W01;
    # 2027-01-01 (a Friday) is in 2026-W53.
    assert weeks == [("2024-W52", 1), ("2025-W01", 1), ("2026-W49", 4), ("2026-W53", 1)]
    for key, _ in weeks:
        year, week = key.split("-W")
        assert 1 <= int(week) <= 53 and len(year) == 4
    months = [
        (row["key"], row["messageCount"]) for row in (await report(proxy, by="month"))["rows"]
    ]
    assert months == [("2024-12", 2), ("2026-11", 1), ("2026-12", 3), ("2027-01", 1)]


async def test_week_keys_match_python_isocalendar(tmp_path: Any) -> None:
    """Every day of eight years: the store's week key is the ISO calendar's."""
    store = SQLiteStore(tmp_path / "weeks.db")
    await store.open(start_writer=False)
    try:
        start = at("2020-01-01T12:00:00")
        days = 8 * 366
        for d in range(days):
            store.add_message(message(id=f"msg_{d}", started_at=start + d * 86400))
        rows = await store.report("week")
        got = {r["key"]: r["message_count"] for r in rows}
        want: dict[str, int] = {}
        for d in range(days):
            y, w, _ = datetime.fromtimestamp(start + d * 86400, UTC).isocalendar()
            want[f"{y}-W{w:02d}"] = want.get(f"{y}-W{w:02d}", 0) + 1
        assert got == want
        assert [r["key"] for r in rows] == sorted(want)
    finally:
        await store.close()


async def test_money_is_summed_exactly(proxy: Proxy) -> None:
    """Three rows of $0.1 are $0.3, not 0.30000000000000004; a billionth of a dollar stays."""
    for i in range(3):
        proxy.store.add_message(message(id=f"msg_{i}", cost_usd=Decimal("0.1"), started_at=at(
            "2026-12-01T10:00:00")))  # fmt: skip
    r = await report(proxy, by="month")
    assert r["rows"][0]["costUsd"] == 0.3 and r["total"]["costUsd"] == 0.3


async def test_models_agents_and_sessions(proxy: Proxy) -> None:
    await seeded(proxy)
    models = (await report(proxy, by="model"))["rows"]
    assert [m["key"] for m in models] == ["gpt-4o", "mystery", None]  # null last
    assert models[1]["costUsd"] is None and models[1]["unpricedMessageCount"] == 1
    assert models[2]["costUsd"] is None
    assert models[0]["costUsd"] == 0.500000001
    agents = {a["key"]: a["messageCount"] for a in (await report(proxy, by="agent"))["rows"]}
    assert agents == {"coder": 2, None: 5}
    sessions = (await report(proxy, by="session"))["rows"]
    assert [(s["key"], s["messageCount"]) for s in sessions] == [("a", 2), ("b", 3), ("c", 2)]
    b = sessions[1]
    assert b["costUsd"] == 0.1 and b["unpricedMessageCount"] == 2 and "label" in b


async def test_since_is_inclusive_and_until_exclusive(proxy: Proxy) -> None:
    await seeded(proxy)
    r = await report(proxy, since="2026-12-01", until="2026-12-01T13:59:59Z")
    assert r["since"] == "2026-12-01T00:00:00Z" and r["until"] == "2026-12-01T13:59:59Z"
    assert r["total"]["messageCount"] == 2  # 00:00:00 in, 13:59:59 out
    day = await report(proxy, since="2026-11-30", until="2026-12-01")  # a date: the whole day
    assert day["until"] == "2026-12-02T00:00:00Z"
    assert day["total"]["messageCount"] == 4
    offset = await report(proxy, since="2026-12-01T14:30:00+01:00")  # 13:30 UTC
    assert offset["since"] == "2026-12-01T13:30:00Z" and offset["total"]["messageCount"] == 3
    one = await report(proxy, session="c", by="day")
    assert one["sessionId"] == "c" and one["total"]["messageCount"] == 2


async def test_durations_count_back_from_now(proxy: Proxy) -> None:
    now = time.time()
    for i, back in enumerate((30, 3 * 3600, 3 * 86400, 10 * 86400)):
        proxy.store.add_message(message(id=f"msg_{i}", started_at=now - back))
    counts = {}
    for since in ("1m", "12h", "7d", "2w", "1d"):
        counts[since] = (await report(proxy, since=since))["total"]["messageCount"]
    assert counts == {"1m": 1, "12h": 2, "7d": 3, "2w": 4, "1d": 2}
    r = await report(proxy, since="7d", until="1d")
    assert r["total"]["messageCount"] == 1


async def test_nothing_in_range_is_zero_not_unknown(proxy: Proxy) -> None:
    await seeded(proxy)
    r = await report(proxy, since="2030-01-01")
    assert r["rows"] == []
    assert r["total"]["messageCount"] == 0 and r["total"]["costUsd"] == 0


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"by": "year"}, "by must be one of hour, day, week, month, model, agent, session"),
        ({"since": "yesterday"}, "since 'yesterday' is not a date"),
        ({"since": "2026-13-01"}, "is not a date"),
        ({"since": "2026-12-01", "until": "2026-11-01"}, "must be before until"),
        ({"until": "-5d"}, "until '-5d' is not a date"),
        ({"since": "99999999d"}, "not a date"),  # 8 digits: not a duration at all
        ({"since": "999999w"}, "longer than a century"),
        ({"since": "0001-01-01"}, "outside the years 1970 to 9999"),
        ({"since": "x" * 1_000}, "…' is not a date"),  # echoed cut short
        ({"session": "bad id"}, "invalid session id"),
    ],
)
async def test_bad_queries_are_400_saying_why(
    proxy: Proxy, query: dict[str, str], says: str
) -> None:
    async with proxy.http.get(proxy.url("/api/report"), params=query) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert says in body["error"]["message"]
    assert len(body["error"]["message"]) < 300


async def test_report_needs_the_admin_token(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    async with proxy.http.get(proxy.url("/api/report")) as resp:
        assert resp.status == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert (await proxy.get_json("/api/report", headers=auth))["rows"] == []


def test_timespec_forms() -> None:
    now = at("2026-12-02T12:00:00")
    assert parse("2026-12-01", now) == at("2026-12-01T00:00:00")
    assert parse("2026-12-01", now, end_of_day=True) == at("2026-12-02T00:00:00")
    assert parse("2026-12-01T13:00", now) == at("2026-12-01T13:00:00")
    assert parse("2026-12-01T13:00Z", now) == at("2026-12-01T13:00:00")
    assert parse(" 90m ", now) == now - 5400 and parse("2W", now) == now - 14 * 86400
    assert parse("45s", now) == now - 45
    for bad in ("", "7", "d", "7y", "1.5d", "2026-12-01T25:00", "nan", "inf"):
        with pytest.raises(TimeSpecError):
            parse(bad, now)
    assert iso(at("2026-12-01T13:05:09.25")) == "2026-12-01T13:05:09.250Z"
    assert iso(None) is None
