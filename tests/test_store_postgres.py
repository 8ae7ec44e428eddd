"""The PostgreSQL store alone, against a real server (tests/helpers/postgres.py): several
processes writing at once, the server stopped and started mid-run, replicas migrating
together, columns added by a newer version, start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

import spendgate.store
from spendgate.records import SessionRecord
from spendgate.settings import Settings
from spendgate.store import StoreOpenError
from spendgate.store_factory import MISSING_EXTRA, journal_path, make_store, safe_url
from spendgate.store_postgres import PostgresStore
from tests.conftest import StartProxy, eventually
from tests.helpers.postgres import PostgresServer, free_port
from tests.helpers.records import message
from tests.upstream import FakeUpstream, fixture_reply

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from decimal import Decimal
    from pathlib import Path
    from spendgate.store_postgres import PostgresStore
    from tests.helpers.records import message

    async def main(url, name, rows, journal):
        store = PostgresStore(url, Path(journal), flush_interval=0.005)
        await store.open()
        for i in range(rows):
            cost = Decimal("0.0000000001") * (i + 1)
            store.add_message(message(id=f"{name}-{i}", session_id=f"s{i % 3}", cost_usd=cost))
            if i % 7 == 0:
                await asyncio.sleep(0.001)  # let the writer commit small, interleaved batches
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    """
)


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _store(url: str, tmp_path: Path, **kw: float) -> PostgresStore:
    return PostgresStore(url, tmp_path / "journal" / "pg", flush_interval=0.02, **kw)


async def test_several_processes_writing_at_once_keep_totals_exact_and_cursors_whole(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """Three writer processes commit interleaved batches while this one pages one
    session's rows with the cursor: the reader sees every row once, and each session's
    totals equal the sum of its rows."""
    reader = _store(pg_url, tmp_path)
    await reader.open()
    rows, names = 300, ("a", "b", "c")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, os.getcwd()])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, pg_url, n, str(rows), str(tmp_path / f"j-{n}")],
            env=env,
        )
        for n in names
    ]
    seen: list[str] = []
    after = 0

    async def page() -> None:
        nonlocal after
        while True:
            batch, cursor = await reader.messages("s0", after, 17)
            seen.extend(m.id for m in batch)
            if batch:  # where the next poll starts (the cursor is None on the last page)
                last = "SELECT seq FROM token_usage WHERE id = $1"
                after = cursor or int(await reader.pool.fetchval(last, batch[-1].id))
            if cursor is None:
                return

    try:
        while any(p.poll() is None for p in procs):
            await page()
            await asyncio.sleep(0.005)
        await page()
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert all(p.returncode == 0 for p in procs)
    expected = {f"{n}-{i}" for n in names for i in range(rows) if i % 3 == 0}
    assert len(seen) == len(set(seen)) and set(seen) == expected
    summed = postgres.psql(
        _db(pg_url),
        "SELECT session_id, COUNT(*), SUM(cost_usd), SUM(input_tokens) FROM token_usage "
        "GROUP BY session_id ORDER BY session_id",
    )
    kept = postgres.psql(
        _db(pg_url),
        "SELECT session_id, message_count, cost_usd, input_tokens FROM session_totals "
        "ORDER BY session_id",
    )
    assert summed == kept and len(summed.splitlines()) == 3
    totals = await reader.spend_by_session()
    each = [Decimal("0.0000000001") * (i + 1) for i in range(rows)]
    assert totals["s1"] == sum(each[1::3]) * len(names)
    await reader.close()


async def test_an_outage_loses_no_row_and_writes_none_twice(
    postgres: PostgresServer,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _store(pg_url, tmp_path)
    await store.open()
    for i in range(20):
        store.add_message(message(id=f"before-{i}"))
    await store.flush()
    postgres.stop()
    try:
        for i in range(30):
            store.add_message(message(id=f"during-{i}"))
        await store.flush()  # short: the database is failing
        await eventually(lambda: _true(store.failing is not None))
        assert store.queue_depth == 30
    finally:
        postgres.start()
    await eventually(lambda: _true(store.queue_depth == 0), timeout=15)
    assert "writes work again" in caplog.text
    count = "SELECT COUNT(*), COUNT(DISTINCT id) FROM token_usage"
    assert postgres.psql(_db(pg_url), count) == "50|50"

    # Down at shutdown: the queue goes to the recovery file, and the next start imports it.
    monkeypatch.setattr(spendgate.store, "CLOSE_WAIT_S", 1.0)
    postgres.stop()
    try:
        for i in range(10):
            store.add_message(message(id=f"at-close-{i}"))
        await store.close()
    finally:
        postgres.start()
    assert "saved to" in caplog.text
    again = _store(pg_url, tmp_path)
    await again.open()
    assert postgres.psql(_db(pg_url), count) == "60|60"
    assert await again.session_totals() == []  # no session rows: the totals table, then
    assert postgres.psql(_db(pg_url), "SELECT message_count FROM session_totals") == "60"
    await again.close()


async def _true(value: bool) -> bool:
    return value


async def test_replicas_starting_together_migrate_once(pg_url: str, tmp_path: Path) -> None:
    stores = [_store(pg_url, tmp_path / str(i)) for i in range(4)]
    await asyncio.gather(*(s.open(start_writer=False) for s in stores))
    versions = await stores[0].pool.fetch("SELECT version FROM spendgate_schema")
    assert [r["version"] for r in versions] == [1]
    for s in stores:
        await s.close()


async def test_a_column_a_newer_version_added_is_added_at_start_up(
    pg_url: str, tmp_path: Path
) -> None:
    store = _store(pg_url, tmp_path)
    await store.open(start_writer=False)
    await store.pool.execute("ALTER TABLE token_usage DROP COLUMN note")
    await store.pool.execute("ALTER TABLE sessions DROP COLUMN label")
    await store.close()
    store = _store(pg_url, tmp_path)
    await store.open()
    store.add_message(message(id="m1", note="estimated"))
    store.save_session(SessionRecord("run-1", 1.0, label="named"))
    assert (await store.latest_message("run-1")).note == "estimated"  # type: ignore[union-attr]
    assert (await store.load_sessions())[0].label == "named"
    await store.close()


async def test_start_up_errors_are_one_line(pg_url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StoreOpenError) as refused:
        await _store(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x", tmp_path).open()
    assert "cannot connect" in str(refused.value) and "secret" not in str(refused.value)
    assert time.monotonic() - started < 6
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(StoreOpenError) as unknown:
        await _store(missing, tmp_path).open()
    assert "no_such_database" in str(unknown.value) and "\n" not in str(unknown.value)


def test_without_asyncpg_the_url_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "spendgate.store_postgres", raising=False)
    settings = Settings(store_url="postgresql://u:pw@127.0.0.1:1/db", db_path=tmp_path / "x.db")
    with pytest.raises(StoreOpenError) as exc:
        make_store(settings)
    assert str(exc.value) == f"postgresql://u:***@127.0.0.1:1/db: {MISSING_EXTRA}"


def test_a_store_url_of_another_kind_stops_start_up() -> None:
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql://"):
        Settings(store_url="mysql://u:pw@h/db")
    for bad in ("postgresql://u:SECRET@h:99999/db", "postgresql://u:SECRET@h:port/db",
                "postgresql://u:SECRET@[::1/db"):  # fmt: skip
        with pytest.raises(ValidationError) as exc:
            Settings(store_url=bad)
        assert "SECRET" not in exc.value.errors()[0]["msg"]  # what start-up prints


def test_a_password_never_shows_and_any_url_has_a_journal_name(tmp_path: Path) -> None:
    cases = {
        "postgresql://u:pw@[::1]:5433/db": "postgresql://u:***@[::1]:5433/db",
        "postgresql://u:p:w@h/db?sslmode=require": "postgresql://u:***@h/db?sslmode=require",
        "postgresql://u@h/db": "postgresql://u@h/db",
        "postgres://h:notaport/db": "postgres://h:notaport/db",
    }
    for url, shown in cases.items():
        assert safe_url(url) == shown
        name = journal_path(url, tmp_path).name
        assert "pw" not in name and name.startswith("postgres-") and "/" not in name
    assert journal_path("postgresql://a@h/x", tmp_path) != journal_path(
        "postgresql://a@h/y", tmp_path
    )


async def test_a_read_on_one_replica_sees_what_another_has_only_queued(
    pg_url: str, tmp_path: Path
) -> None:
    """Read-your-writes across replicas: A's writer would not commit for a minute, yet
    B's read (after A's request finished, its row queued) finds the row."""
    a = PostgresStore(pg_url, tmp_path / "a" / "pg", flush_interval=60)
    b = PostgresStore(pg_url, tmp_path / "b" / "pg", flush_interval=60)
    await a.open()
    await b.open()
    a.save_session(SessionRecord("run-1", 1.0))
    a.add_message(message(id="m1", cost_usd=Decimal("0.25")))
    assert a.queue_depth == 2
    started = time.monotonic()
    assert await b.spend_by_session() == {"run-1": Decimal("0.25")}
    assert time.monotonic() - started < 0.9  # answered, not timed out
    assert a.queue_depth == 0
    reader = PostgresStore(pg_url, tmp_path / "r" / "pg")  # the CLI: no writer of its own
    await reader.open(start_writer=False)
    b.add_message(message(id="m2"))
    (tot,) = await reader.totals("run-1")
    assert tot["message_count"] == 2
    for i in range(3):
        a.add_message(message(id=f"c{i}"))
    rounds = reader._barrier._tokens  # type: ignore[union-attr]
    before = next(rounds)
    seen = await asyncio.gather(*(reader.totals("run-1") for _ in range(20)))
    assert all(t[0]["message_count"] == 5 for t in seen)  # every read after the writes
    assert next(rounds) - before <= 3  # reads that came together shared the rounds
    await a.close()
    started = time.monotonic()
    await reader.totals("run-1")  # A is gone: nobody to wait for but B
    assert time.monotonic() - started < 0.9
    await b.close()
    await reader.close()


async def test_a_replica_that_does_not_answer_delays_a_read_by_one_second_at_most(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    hung = await asyncpg.connect(
        pg_url, server_settings={"application_name": "spendgate-writer hung"}
    )
    store = _store(pg_url, tmp_path)
    await store.open()
    store.add_message(message(id="m1"))
    started = time.monotonic()
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 1
    assert 0.9 < time.monotonic() - started < 3
    assert "1 of 1 other replicas did not confirm" in caplog.text
    await hung.close()
    await store.close()


async def test_the_proxy_on_postgres_forwards_through_an_outage_and_keeps_every_row(
    postgres: PostgresServer, pg_url: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Two proxies (replicas) on one database: requests through A while PostgreSQL is
    down are answered; B's session list (read from the store; a session's own routes
    need the shared ledger) has every row once the server is back."""
    a = await start_proxy(store_url=pg_url)
    b = await start_proxy(store_url=pg_url, db_path=a.settings.db_path.parent / "b" / "x.db")
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")

    async def ask(n: int) -> None:
        c = openai.AsyncOpenAI(base_url=a.url("/s/pg/openai/v1"), api_key="k", max_retries=0)
        async with c:
            for _ in range(n):
                await c.chat.completions.create(
                    model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
                )

    async def listed_on_b() -> int:
        (row,) = (await b.get_json("/api/sessions"))["sessions"]
        return int(row["messageCount"])

    await ask(3)
    assert await listed_on_b() == 3  # read on B right after A's requests
    postgres.stop()
    try:
        await ask(4)
        async with b.http.get(b.url("/api/sessions")) as resp:
            down = resp.status
    finally:
        postgres.start()
    assert down >= 500
    await eventually(lambda: _true(a.store.queue_depth == 0), timeout=15)
    assert await listed_on_b() == 7 and (await a.cost("pg"))["messageCount"] == 7
    assert postgres.psql(_db(pg_url), "SELECT COUNT(DISTINCT id) FROM token_usage") == "7"


async def test_values_postgresql_cannot_hold_are_set_aside_and_nothing_wedges(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """A NUL in text (PostgreSQL refuses it), a lone surrogate (asyncpg cannot encode
    it), an integer past 64 bits: each row goes to rejected_rows with its reason, the
    rest of the batch is written, and the writer is not failing."""
    store = _store(pg_url, tmp_path)
    await store.open()
    store.add_message(message(id="ok1"))
    store.add_message(message(id="nul", session_id="a\x00b"))
    store.add_message(message(id="surrogate", model="\ud800x"))
    store.add_message(message(id="big", status=2**70))
    store.save_session(SessionRecord("s\x00", 1.0))
    store.add_message(message(id="ok2"))
    page, _ = await store.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["ok1", "ok2"]
    assert store.failing is None and store.queue_depth == 0 and store.rejected == 4
    kinds = postgres.psql(_db(pg_url), "SELECT kind, data FROM rejected_rows")
    ids = sorted((line.split("|")[0], json.loads(line.split("|", 1)[1])["id"])
                 for line in kinds.splitlines())  # fmt: skip
    assert ids == [("message", "big"), ("message", "nul"), ("message", "surrogate"),
                   ("session", "s\x00")]  # fmt: skip
    await store.close()


async def test_a_batch_that_commits_late_is_never_skipped_by_a_cursor(
    pg_url: str, tmp_path: Path
) -> None:
    """Replica X is half way through its batch: its row has a seq, its transaction is
    open. Replica A then writes a row of the same session. Were A's batch to commit
    first, a reader would see A's row (the higher seq), and its cursor would pass X's
    row for good. A's batch waits for X's lock instead: a reader sees both, X's first."""
    from spendgate.store_postgres import (
        TABLES,
        WRITE_LOCK,
        _json_rows,
        _message_params,
        _rows_from_json,
    )

    a = _store(pg_url, tmp_path / "a")
    reader = _store(pg_url, tmp_path / "r")
    await a.open()
    await reader.open(start_writer=False)
    x = await a.pool.acquire()
    tx = x.transaction()
    await tx.start()
    await x.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
    names = ", ".join(c.name for c in TABLES["message"])
    await x.execute(  # the first half of X's batch statement: the row, not yet its totals
        f"INSERT INTO token_usage ({names}) {_rows_from_json('message')}",
        _json_rows([_message_params(message(id="x"))]),
    )
    a.add_message(message(id="a"))
    await asyncio.sleep(0.3)  # A's writer has started its batch, and waits for the lock
    page, _ = await reader.messages("run-1", 0, 10)
    assert page == []  # A's row did not overtake X's
    await tx.commit()
    await a.pool.release(x)
    await eventually(lambda: _true(a.queue_depth == 0))
    page, _ = await reader.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["x", "a"]
    await a.close()
    await reader.close()


async def test_while_postgres_is_down_the_queue_is_bounded_and_drops_loudly(
    postgres: PostgresServer, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dropped: list[int] = []
    errors: list[int] = []
    store = PostgresStore(pg_url, tmp_path / "pg", flush_interval=0.02, max_queue=10,
                          on_drop=dropped.append, on_error=errors.append)  # fmt: skip
    await store.open()
    postgres.stop()
    try:
        for i in range(15):
            store.add_message(message(id=f"m{i}"))
        await eventually(lambda: _true(bool(errors)))
    finally:
        postgres.start()
    assert store.queue_depth <= 10 and sum(dropped) == 5
    assert "storage queue full (10): dropping the oldest" in caplog.text
    await eventually(lambda: _true(store.queue_depth == 0), timeout=15)
    page, _ = await store.messages("run-1", 0, 20)
    assert [m.id for m in page] == [f"m{i}" for i in range(5, 15)]  # the newest ten
    await store.close()


_HOSTILE = [  # (column, value as a journal line may hold it, _typed's reason)
    ("input_tokens", 1.5, "not a whole number: 1.5"),
    ("input_tokens", 2.0, "not a whole number: 2.0"),
    ("output_tokens", "300", "not a whole number: '300'"),
    ("status", True, "not a whole number: True"),
    ("model", 5, "not text: 5"),
    ("model", ["gpt"], "not text: ['gpt']"),
    ("cost_usd", "NaN", "not a finite number: 'NaN'"),
    ("cost_usd", "Infinity", "not a finite number: 'Infinity'"),
    ("cost_usd", True, "not a number: True"),
    ("cost_usd", "cheap", "not a number: 'cheap'"),
    ("cost_usd", {"usd": 1}, "not a number: {'usd': 1}"),
    ("started_at", "0", "not a number: '0'"),
    ("stream", "yes", "not a flag: 'yes'"),
]


def _row_with(column: str, value: object, **kw: object) -> list[object]:
    from spendgate.store import OP_COLUMNS
    from spendgate.store_postgres import _message_params

    row = list(_message_params(message(**kw)))
    row[OP_COLUMNS["message"].index(column)] = value
    return row


async def test_the_server_refuses_in_a_batch_every_value_the_row_check_refuses(
    pg_url: str, tmp_path: Path
) -> None:
    """The batch statement types the JSON rows server-side: a value ``_typed`` refuses
    must fail the statement (a row error, so the batch goes row by row), never be stored
    rounded or turned to text; the same row as ``_typed`` gives it is written."""
    from spendgate.store_postgres import _WRITES, _json_rows, _typed, is_row_error

    store = _store(pg_url, tmp_path)
    await store.open()
    async with store.pool.acquire() as conn:
        for i, (column, value, _) in enumerate(_HOSTILE):
            row = _row_with(column, value, id=f"bad{i}")
            with pytest.raises(Exception) as refused:
                async with conn.transaction():
                    await conn.fetchval(_WRITES["message"], _json_rows([row]))
            assert is_row_error(refused.value), (column, value, refused.value)
        for column, value in (("stream", 1), ("cost_usd", 0.1), ("cost_usd", 3)):
            typed = _typed("message", _row_with(column, value, id=f"ok-{column}-{value}"))
            async with conn.transaction():
                assert await conn.fetchval(_WRITES["message"], _json_rows([typed])) == 1
        assert await conn.fetchval("SELECT COUNT(*) FROM token_usage") == 3
    await store.close()


async def test_bad_values_in_an_imported_batch_are_set_aside_with_their_reasons(
    postgres: PostgresServer, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited recovery file (the one place rows come from outside this process):
    each bad value's row lands in rejected_rows with the row check's reason; the rest of
    the batch is stored once (its first attempt, refused, is undone whole), a flag
    written as 1 and money written as a JSON number too, exactly; the writer is not
    failing."""
    from spendgate import journal
    from spendgate.store import OP_COLUMNS
    from spendgate.store_postgres import _record_params

    store = _store(pg_url, tmp_path)
    lines = [journal.header(OP_COLUMNS)]
    session = SessionRecord("run-1", 1.0, Decimal("5.10"), label="imported")
    lines.append(journal.encode("session", _record_params("session", session)))
    good = [
        _row_with("stream", 1, id="flag-as-1"),
        _row_with("cost_usd", 0.1, id="money-as-number"),
        _row_with("cost_usd", "0.00030735", id="plain"),
    ]
    bad = [_row_with(c, v, id=f"bad{i}") for i, (c, v, _) in enumerate(_HOSTILE)]
    lines += [journal.encode("message", row) for row in [good[0], *bad, *good[1:]]]
    where = journal.recovery_paths(store.journal_path)[0]
    where.parent.mkdir(parents=True)
    where.write_bytes(b"".join(lines))
    await store.open()
    await store.flush()
    page, _ = await store.messages("run-1", 0, 50)
    assert [(m.id, m.stream, m.cost_usd) for m in page] == [
        ("flag-as-1", True, Decimal("0.00030735")),
        ("money-as-number", True, Decimal("0.1")),
        ("plain", True, Decimal("0.00030735")),
    ]
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 3 and tot["cost_usd"] == Decimal("0.1006147")
    assert store.failing is None and store.queue_depth == 0 and store.rejected == len(bad)
    found = postgres.psql(_db(pg_url), "SELECT reason, data FROM rejected_rows ORDER BY id")
    reasons = {}
    for line in found.splitlines():
        reason, data = line.split("|", 1)
        reasons[json.loads(data)["id"]] = reason
    assert reasons == {f"bad{i}": f"_BadValue: {why}" for i, (_, _, why) in enumerate(_HOSTILE)}
    assert f"3 new message rows, 0 already stored, {len(bad)} rejected" in caplog.text
    assert await store.load_sessions() == [session]
    assert await store.spend_by_session() == {"run-1": Decimal("0.1006147")}
    await store.close()


async def test_a_write_of_the_wrong_shape_is_set_aside_and_nothing_wedges(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A queued write with a value too few, or of an operation no table has (a bug, or a
    newer version's journal): rejected with its reason, the others written."""
    from spendgate.store_postgres import _message_params

    store = _store(pg_url, tmp_path)
    await store.open()
    store.add_message(message(id="ok1"))
    store._enqueue("message", list(_message_params(message(id="short")))[:-1])
    store._enqueue("bogus", ["x"])
    store.add_message(message(id="ok2"))
    page, _ = await store.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["ok1", "ok2"]
    assert store.failing is None and store.queue_depth == 0 and store.rejected == 2
    async with store.pool.acquire() as conn:
        found = await conn.fetch("SELECT kind, reason FROM rejected_rows ORDER BY id")
    width = len(list(_message_params(message())))
    assert [tuple(r) for r in found] == [
        ("message", f"_BadValue: {width - 1} values for {width} columns"),
        ("bogus", "_BadValue: unknown operation 'bogus'"),
    ]
    await store.close()


async def test_a_server_limit_is_a_row_error_and_a_lost_server_is_not(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """A batch whose JSON passes jsonb's 256 MB (SQLSTATE 54000, as any "too large")
    is written again row by row rather than retried whole for ever; a connection lost
    keeps the rows queued. Both errors are the server's own."""
    import asyncpg

    from spendgate.store_postgres import is_row_error

    conn = await asyncpg.connect(pg_url)
    with pytest.raises(asyncpg.PostgresError) as too_large:
        await conn.fetchval("SELECT repeat('xx', 600000000)")
    assert too_large.value.sqlstate == "54000" and is_row_error(too_large.value)
    with pytest.raises(Exception) as lost:
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert not is_row_error(lost.value)
    await conn.close()


async def test_a_batch_cancelled_while_it_waits_for_the_lock_leaves_no_transaction_open(
    postgres: PostgresServer,
    pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another replica holds the writers' lock; this store's batch waits in its BEGIN
    and lock query when the store closes and gives up on it: the batch is rolled back
    (asyncpg's pool never finds a transaction left open), its row goes to the recovery
    file, and the next start writes it."""
    import asyncpg

    from spendgate.store_postgres import WRITE_LOCK

    monkeypatch.setattr(spendgate.store, "CLOSE_WAIT_S", 0.3)
    store = _store(pg_url, tmp_path)
    await store.open()
    holder = await asyncpg.connect(pg_url)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
    store.add_message(message(id="m1"))
    await asyncio.sleep(0.3)  # the writer's batch is waiting for the lock
    await store.close()
    waiting = postgres.psql(
        _db(pg_url),
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
    )
    await tx.rollback()
    await holder.close()
    assert waiting == "1"  # the holder's alone
    assert "active transaction" not in caplog.text
    again = _store(pg_url, tmp_path)
    await again.open()
    page, _ = await again.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["m1"]
    await again.close()
