"""The storage seam and its SQLite implementation (docs/reference.md §5).

The request path never waits for the disk: ``add_message``/``save_session`` append to
an in-memory queue and to the journal (:mod:`spendgate.journal`), and a single writer
task commits batches on a short interval. Reads call ``flush()`` first, so every API
read reflects every finished request.

No write can wedge the writer: a batch the database refuses is written again row by
row, and a row the database refuses (a constraint, a value out of range, an integer
SQLite cannot bind) goes to ``rejected_rows`` with the reason while the others are
written. A database that refuses every write (full disk, I/O error, locked) keeps the
rows queued (bounded) and retried with backoff; reads stop waiting for them; at
shutdown what is still queued goes to the recovery file, which the next start imports.
A database file deleted or replaced while running is noticed within a second or two
and recreated from what the open connection still reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from decimal import Decimal
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from spendgate import journal
from spendgate.records import (
    COLUMNS,
    FLAG,
    MONEY,
    STORED_FIELDS,
    TIME,
    VALUE,
    AgentBudgetRecord,
    GlobalBudgetRecord,
    MessageRecord,
    Pruned,
    SessionRecord,
)
from spendgate.timespec import iso_bound as _iso_bound

log = logging.getLogger("spendgate.store")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        budget_usd REAL,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        label TEXT,
        updated_at REAL
    );
    CREATE TABLE token_usage (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        agent_id TEXT,
        route TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        cost_usd REAL,
        estimated INTEGER NOT NULL,
        aborted INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ttft_ms REAL,
        duration_ms REAL NOT NULL,
        key_fingerprint TEXT,
        error TEXT
    );
    CREATE INDEX token_usage_session ON token_usage (session_id, seq);
    """,
    """
    CREATE TABLE agent_budgets (
        session_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        budget_usd REAL,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        updated_at REAL,
        PRIMARY KEY (session_id, agent_id)
    );
    CREATE TABLE global_budget (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        budget_usd REAL,
        configured_usd REAL,
        updated_at REAL
    );
    CREATE INDEX token_usage_started ON token_usage (started_at);
    """,
    """
    ALTER TABLE token_usage ADD COLUMN note TEXT;
    CREATE TABLE rejected_rows (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        data TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE token_usage ADD COLUMN transport TEXT NOT NULL DEFAULT 'http';
    """,
    # how a row was priced (#18, docs/reference.md §4, §5)
    """
    ALTER TABLE token_usage ADD COLUMN service_tier TEXT;
    ALTER TABLE token_usage ADD COLUMN input_audio_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE token_usage ADD COLUMN input_image_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE token_usage ADD COLUMN output_audio_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE token_usage ADD COLUMN output_image_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE token_usage ADD COLUMN tool_cost_usd REAL;
    ALTER TABLE token_usage ADD COLUMN table_cost_usd REAL;
    ALTER TABLE token_usage ADD COLUMN priced_as TEXT;
    ALTER TABLE token_usage ADD COLUMN price_source TEXT;
    """,
)

COST_DIGITS = 10
"""Sums of REAL costs are rounded to 1e-10 USD: far below any price step, and it removes
binary float noise (0.010000000000000002 → 0.01)."""


def _bind_null(value: None) -> None:
    return value


# sqlite3 binds a value not exactly int, float, str or bytearray (None, a bool: 14 of a
# message row's) only after two failed look-ups, __adapt__ and __conform__, each making
# an AttributeError; a registered adapter is found first (a dict look-up and a call),
# ~1,900 instructions less a value, and binds the same: NULL, INTEGER 0/1 (bench/results.md).
sqlite3.register_adapter(type(None), _bind_null)
sqlite3.register_adapter(bool, int)

_INSERT_COLUMNS = ", ".join(c.sql for c in COLUMNS)
_SELECT_COLUMNS = ", ".join(c.sql for c in STORED_FIELDS)
"""A SELECT of these yields a row in :class:`MessageRecord`'s field order."""
_MESSAGE_ROW = f"({', '.join('?' * len(COLUMNS))})"
INSERT_CHUNK = 256
"""Rows per INSERT statement. One multi-row statement binds all its parameters in one C
call and runs one step without the GIL, where ``executemany`` hands the GIL back and
forth twice per row, which costs the event loop thread more than the insert itself."""


BATCH_MAX = 4096
"""Writes per transaction: a long queue (after an outage) is written in several, so a
read waiting on the connection never waits long."""
WAKE_AT = 500
"""Queued writes that wake the writer before its interval."""
OPEN_BUSY_S = 1.5
"""At start-up, how long to wait for a lock another process holds before giving up (with
the quick_check's second and the imports' second or so, a refused start takes < 5 s)."""
BUSY_MS = 500
"""While running, how long a write waits for another process's lock before the batch
fails and is retried (reads share the connection, so this bounds their wait too)."""
QUICK_CHECK_S = 1.0
"""``PRAGMA quick_check`` at start-up stops after this long (a big file is only partly
checked, and the log says so). It reads every page: 1.2 s for a 415 MB file (2 million
rows) from the page cache; ``integrity_check`` took 8.3 s on it (bench/results.md)."""
WATCH_S = 1.0
"""How often the writer checks that the database file is still the one it has open."""
CLOSE_WAIT_S = 10.0
"""At shutdown, how long the writer gets to commit what is queued; the rest goes to the
recovery file."""
FAILING_FLUSH_S = 0.5
"""While the database refuses writes, how long a read waits for the writer's next try."""
REPEAT_LOG_S = 30.0
"""A failure that lasts is logged again, with its counts, this often."""
TOKEN_LIMIT = 10**12
"""The largest token count a row may hold (the adapters stop at 10**10): far above any
real response, far below what overflows SQLite's 64-bit sums."""
COST_LIMIT = 1e12
"""The largest cost in USD a row may hold."""

_COUNTED = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
            "reasoning_tokens")  # fmt: skip
_SANE_ROW = (
    "CREATE TRIGGER IF NOT EXISTS token_usage_sane BEFORE INSERT ON token_usage WHEN "
    + " OR ".join(
        f"typeof(NEW.{c}) != 'integer' OR NEW.{c} NOT BETWEEN 0 AND {TOKEN_LIMIT}" for c in _COUNTED
    )
    + f" OR (NEW.cost_usd IS NOT NULL AND NOT (NEW.cost_usd BETWEEN 0 AND {COST_LIMIT:.0f}))"
    + " BEGIN SELECT RAISE(ABORT, 'token counts must be whole numbers from 0 to 10^12, "
    "and the cost a number from 0 to 10^12 USD'); END"
)
"""The database refuses a row whose numbers cannot be right (a float such as 1e300, a
negative count, text): created at every open (not a numbered migration), so it needs
no schema version of its own."""
_INSERT_REJECTED = "INSERT INTO rejected_rows (at, kind, reason, data) VALUES (?, ?, ?, ?)"


@functools.lru_cache(maxsize=16)
def _insert_messages(rows: int) -> str:
    values = ", ".join([_MESSAGE_ROW] * rows)
    return (
        f"INSERT INTO token_usage ({_INSERT_COLUMNS}) VALUES {values} "
        "ON CONFLICT(id) DO NOTHING"  # a row imported twice; any other constraint fails
    )


def _insert_chunks(
    rows: list[Sequence[Any]],
) -> Iterator[tuple[str, list[Any], list[Sequence[Any]]]]:
    """``rows`` as a few multi-row INSERTs: full chunks, then the rest in powers of two
    (so at most a dozen distinct statements are ever prepared and cached). Each comes
    with its rows, to be written one by one if the database refuses the chunk."""
    i, n = 0, len(rows)
    size = INSERT_CHUNK
    while i < n:
        while size > n - i:
            size //= 2
        chunk = rows[i : i + size]
        flat: list[Any] = []
        for row in chunk:
            flat.extend(row)
        yield _insert_messages(size), flat, chunk
        i += size


def is_row_error(exc: BaseException) -> bool:
    """Did the database refuse this row (its values), rather than fail as a whole?

    Row errors: a constraint (NOT NULL, the sanity trigger), a datatype mismatch, a
    string or blob too big, a value sqlite3 cannot bind (an integer of 2**63 or more is
    an OverflowError, an unsupported type a ProgrammingError). Everything else (full
    disk, I/O error, locked, read-only, damaged) is the database's, and keeps the rows.
    """
    if isinstance(exc, (OverflowError, sqlite3.IntegrityError, sqlite3.DataError)):
        return True
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return "binding" in str(exc)  # not "Cannot operate on a closed database"
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(("SQLITE_CONSTRAINT", "SQLITE_MISMATCH", "SQLITE_TOOBIG"))


class StoreOpenError(Exception):
    """The database cannot be used: says which (a file, or a server's database) and
    why, in one line."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _problem(exc: BaseException, lock_wait: float = OPEN_BUSY_S) -> str:
    """What a start-up failure means, in words."""
    text = str(exc)
    name = getattr(exc, "sqlite_errorname", None) or ""
    known = (
        ("SQLITE_NOTADB", "it is not a SQLite database"),
        ("SQLITE_CORRUPT", "the file is damaged"),
        ("SQLITE_BUSY", f"another process has held it locked for more than {lock_wait:g} s"),
        ("SQLITE_LOCKED", f"another process has held it locked for more than {lock_wait:g} s"),
        ("SQLITE_READONLY", "it cannot be written"),
        ("SQLITE_CANTOPEN", "it cannot be opened"),
        ("SQLITE_FULL", "the disk is full"),
        ("SQLITE_IOERR", "I/O error"),
        ("SQLITE_PERM", "permission denied"),
    )
    for prefix, meaning in known:
        if name.startswith(prefix):
            return f"{meaning} ({text})"
    return f"{text} ({name})" if name else text


def _read_only_reason(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    mode = path.stat().st_mode & 0o777 if path.exists() else 0
    kind = "file" if path.is_file() else "directory"
    return f"the {kind} is read-only for this user (mode {mode:o})"


def _preflight(path: Path) -> None:
    """The checks SQLite's own errors say least clearly about."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create its directory {parent} ({exc.strerror})"
        raise StoreOpenError(path, problem) from None
    if path.is_dir():
        raise StoreOpenError(path, "it is a directory, not a database file")
    if path.exists():
        if not os.access(path, os.R_OK):
            raise StoreOpenError(path, "it cannot be read (permission denied)")
        if not os.access(path, os.W_OK):
            raise StoreOpenError(path, f"it cannot be written: {_read_only_reason(path)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreOpenError(
            path,
            f"its directory {parent} cannot be written ({_read_only_reason(parent)}); "
            f"SQLite creates {path.name}-wal and {path.name}-shm beside the database",
        )


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


async def _connect(path: Path, timeout: float) -> aiosqlite.Connection:
    conn = aiosqlite.connect(path, timeout=timeout, isolation_level=None)
    thread = getattr(conn, "_thread", None)
    if thread is not None:  # a connection left open must never keep the process alive
        thread.daemon = True
    db = await conn
    db.row_factory = aiosqlite.Row
    return db


async def _patiently(
    db: aiosqlite.Connection, deadline: float, sql: str, script: bool = False
) -> Any:
    """Run ``sql`` (its first value, if any; a whole ``script``), retrying while another
    process holds the lock, until ``deadline``. The wait is here, in asyncio.sleep,
    rather than in SQLite's busy handler, which nothing interrupts: SIGTERM stops it."""
    while True:
        try:
            if script:
                await db.executescript(sql)
                return None
            async with db.execute(sql) as cur:
                row = await cur.fetchone()
            return row[0] if row else None
        except sqlite3.OperationalError as exc:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            name = getattr(exc, "sqlite_errorname", None) or ""
            if not name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.05)


async def _close_quietly(db: aiosqlite.Connection) -> None:
    """Close a connection whatever state it is in (a query running: interrupted first)."""
    with contextlib.suppress(Exception):
        await db.interrupt()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(db.close(), 5)


def _entry_lines(entries: Iterable[tuple[str, Sequence[Any], bool]]) -> Iterator[bytes]:
    for op, params, _ in entries:
        yield journal.encode(op, params)


_UPSERT_SESSION = (
    "INSERT INTO sessions (id, created_at, budget_usd, paused, pause_reason, label, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET budget_usd=excluded.budget_usd, "
    "paused=excluded.paused, pause_reason=excluded.pause_reason, label=excluded.label, "
    "updated_at=excluded.updated_at"
)
_UPSERT_AGENT = (
    "INSERT INTO agent_budgets (session_id, agent_id, budget_usd, paused, pause_reason, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(session_id, agent_id) DO UPDATE SET "
    "budget_usd=excluded.budget_usd, paused=excluded.paused, "
    "pause_reason=excluded.pause_reason, updated_at=excluded.updated_at"
)
_UPSERT_GLOBAL = (
    "INSERT INTO global_budget (id, budget_usd, configured_usd, updated_at) VALUES (1, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET budget_usd=excluded.budget_usd, "
    "configured_usd=excluded.configured_usd, updated_at=excluded.updated_at"
)
_UPSERTS = {"session": _UPSERT_SESSION, "agent": _UPSERT_AGENT, "global": _UPSERT_GLOBAL}
"""The writer's record operations (all but ``message``), in the order they are written."""
_TOTALS = (
    "COUNT(*) AS message_count, COALESCE(SUM(input_tokens), 0) AS input_tokens, "
    "COALESCE(SUM(output_tokens), 0) AS output_tokens, "
    "COALESCE(SUM(cached_input_tokens), 0) AS cached_input_tokens, "
    "COALESCE(SUM(cache_write_tokens), 0) AS cache_write_tokens, "
    "COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens, "
    f"ROUND(SUM(cost_usd), {COST_DIGITS}) AS cost_usd, "
    "COALESCE(SUM(cost_usd IS NULL AND total_tokens > 0), 0) AS unpriced_message_count, "
    "MAX(started_at) AS last_at"
)
"""``cost_usd`` sums the priced rows (NULL: none). A row is unpriced when its cost is
unknown and it has tokens: a row without tokens costs nothing whatever the price (an
unmetered request, such as a model listing, is stored with a NULL cost)."""


REPORT_BY = ("hour", "day", "week", "month", "model", "agent", "session")
"""What a report over time groups by (docs/reference.md §8 ``GET /api/report``)."""
_BUCKET_S = {"hour": 3600, "day": 86400, "week": 86400, "month": 86400}
"""Time reports sum rows into whole hours or days first (an integer per row, cheap),
then name and merge those few buckets: weeks and months are made of days."""
_BUCKET_KEY = {
    "hour": "strftime('%Y-%m-%dT%H:00Z', b * 3600, 'unixepoch')",
    "day": "strftime('%Y-%m-%d', b * 86400, 'unixepoch')",
    "month": "strftime('%Y-%m', b * 86400, 'unixepoch')",
    # ISO 8601 week: the year and week of the week's Thursday (back 3 days, then on to
    # the next Thursday or the day itself); SQLite 3.40 has no %G or %V.
    "week": "strftime('%Y', date(b * 86400, 'unixepoch', '-3 days', 'weekday 4')) || '-W' || "
    "printf('%02d', (strftime('%j', date(b * 86400, 'unixepoch', '-3 days', 'weekday 4')) - 1)"
    " / 7 + 1)",
}
_GROUP_COLUMN = {"model": "model", "agent": "agent_id", "session": "session_id"}
_REPORT_SUMS = (
    "COUNT(*) AS message_count, SUM(input_tokens) AS input_tokens, "
    "SUM(output_tokens) AS output_tokens, SUM(cached_input_tokens) AS cached_input_tokens, "
    "SUM(cost_usd) AS cost_usd, SUM(cost_usd IS NULL AND total_tokens > 0) "
    "AS unpriced_message_count"
)
_REPORT_MERGE = (
    "SUM(message_count) AS message_count, SUM(input_tokens) AS input_tokens, "
    "SUM(output_tokens) AS output_tokens, SUM(cached_input_tokens) AS cached_input_tokens, "
    f"ROUND(SUM(cost_usd), {COST_DIGITS}) AS cost_usd, "
    "SUM(unpriced_message_count) AS unpriced_message_count"
)


def _report_sql(
    by: str, since: float | None, until: float | None, session: str | None
) -> tuple[str, list[Any]]:
    """One report query: rows in ``[since, until)`` (of one session), grouped ``by``,
    sorted by key. Only the bounds given become conditions, so an all-time report scans
    the table rather than walking the ``started_at`` index end to end."""
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("started_at >= ?")
        params.append(since)
    if until is not None:
        where.append("started_at < ?")
        params.append(until)
    if session is not None:
        where.append("session_id = ?")
        params.append(session)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    if by in _BUCKET_S:
        inner = (
            f"SELECT CAST(started_at / {_BUCKET_S[by]} AS INTEGER) AS b, {_REPORT_SUMS} "
            f"FROM token_usage{cond} GROUP BY b"
        )
        sql = f"SELECT {_BUCKET_KEY[by]} AS key, {_REPORT_MERGE} FROM ({inner}) GROUP BY key"
    elif by in _GROUP_COLUMN:
        column = _GROUP_COLUMN[by]
        # +column: group by sorting what the bounds select, not by walking the session
        # index over every row (1.2 s instead of 10 ms for a week of 300,000 rows)
        sql = f"SELECT {column} AS key, {_REPORT_SUMS} FROM token_usage{cond} GROUP BY +{column}"
        sql = f"SELECT key, {_REPORT_MERGE} FROM ({sql}) GROUP BY key"
    else:
        raise ValueError(f"unknown report grouping {by!r}")
    if by == "session":
        sql = f"SELECT g.*, s.label AS label FROM ({sql}) g LEFT JOIN sessions s ON s.id = g.key"
    return sql + " ORDER BY key IS NULL, key", params


_NO_TOTALS: dict[str, Any] = {
    "message_count": 0, "input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0,
    "cache_write_tokens": 0, "reasoning_tokens": 0, "cost_usd": None,
    "unpriced_message_count": 0, "last_at": None,
}  # fmt: skip
_SUMMED = ("message_count", "input_tokens", "output_tokens", "cached_input_tokens",
           "cache_write_tokens", "reasoning_tokens", "unpriced_message_count")  # fmt: skip


def _add_totals(into: dict[str, Any], r: aiosqlite.Row) -> None:
    """Add one ``_TOTALS`` row (the sums over some new rows) to a session's running totals."""
    for key in _SUMMED:
        into[key] += r[key]
    if r["cost_usd"] is not None:  # NULL: no priced row among them
        into["cost_usd"] = (into["cost_usd"] or Decimal(0)) + Decimal(repr(r["cost_usd"]))
    if r["last_at"] is not None and (into["last_at"] is None or r["last_at"] > into["last_at"]):
        into["last_at"] = r["last_at"]


def _cost(total: Decimal | None) -> float | None:
    """A running cost total as the API shows it: rounded as SQL's ROUND(SUM(cost_usd))."""
    return None if total is None else float(round(total, COST_DIGITS))


def _money(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(repr(value))


_message_values: Callable[[MessageRecord], tuple[Any, ...]] = attrgetter(*(c.attr for c in COLUMNS))
_MONEY_AT = tuple(i for i, c in enumerate(COLUMNS) if c.kind == MONEY)
# FLAG columns need no encoding: sqlite3 binds a bool as the INTEGER 0 or 1.


def message_encoder(money: Callable[[Decimal], Any]) -> Callable[[MessageRecord], Sequence[Any]]:
    """How a store queues a row: its values in ``COLUMNS`` order, each MONEY value
    passed through ``money`` (SQLite: a float; PostgreSQL: the exact decimal string)."""

    def params(m: MessageRecord) -> Sequence[Any]:  # on the request path
        values = _message_values(m)
        if not _MONEY_AT:
            return values
        out = list(values)
        for i in _MONEY_AT:
            if out[i] is not None:
                out[i] = money(out[i])
        return out

    return params


_message_params = message_encoder(float)
"""The INSERT parameters of one row, in ``COLUMNS`` order."""


_DECODE: dict[str, Callable[[Any], Any] | None] = {
    VALUE: None,
    TIME: None,
    FLAG: bool,
    MONEY: _money,
}
_DECODERS = tuple(_DECODE[c.kind] for c in STORED_FIELDS)


def _message_from_row(r: Sequence[Any]) -> MessageRecord:
    """A row of ``SELECT {_SELECT_COLUMNS}`` (anything after those is ignored)."""
    values = [
        v if decode is None else decode(v)
        for decode, v in zip(_DECODERS, r[: len(_DECODERS)], strict=True)
    ]
    return MessageRecord(*values)


def _session_params(s: SessionRecord) -> tuple[Any, ...]:
    budget = None if s.budget_usd is None else float(s.budget_usd)
    return (s.id, s.created_at, budget, int(s.paused), s.pause_reason, s.label, time.time())


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _agent_params(a: AgentBudgetRecord) -> tuple[Any, ...]:
    budget = _float(a.budget_usd)
    return (a.session_id, a.agent_id, budget, int(a.paused), a.pause_reason, time.time())


def _global_params(g: GlobalBudgetRecord) -> tuple[Any, ...]:
    return (_float(g.budget_usd), _float(g.configured), time.time())


def _session_from_row(r: aiosqlite.Row) -> SessionRecord:
    return SessionRecord(
        id=r["id"],
        created_at=r["created_at"],
        budget_usd=_money(r["budget_usd"]),
        paused=bool(r["paused"]),
        pause_reason=r["pause_reason"],
        label=r["label"],
    )


class Store(Protocol):
    """What the proxy and API need from storage: :class:`SQLiteStore`, or
    :class:`spendgate.store_postgres.PostgresStore` (``store_factory.make_store``).

    ``flush`` is read-your-writes for this process: every write it queued before the
    call is committed (or the database is failing). Money in reads is a ``Decimal``
    where the database keeps it exactly (PostgreSQL), a float where it does not (SQLite
    sums): consumers take either (``reports``)."""

    @property
    def queue_depth(self) -> int: ...

    async def open(self, start_writer: bool = True) -> None: ...

    async def close(self) -> None: ...

    def add_message(self, message: MessageRecord) -> None: ...

    def save_session(self, session: SessionRecord) -> None: ...

    def save_agent_budget(self, agent: AgentBudgetRecord) -> None: ...

    def save_global_budget(self, budget: GlobalBudgetRecord) -> None: ...

    async def flush(self) -> None: ...

    async def load_sessions(self) -> list[SessionRecord]: ...

    async def load_agent_budgets(self) -> list[AgentBudgetRecord]: ...

    async def load_global_budget(self) -> GlobalBudgetRecord | None: ...

    async def spend_by_session(self) -> dict[str, Decimal]: ...

    async def agent_spend(
        self, agents: Iterable[tuple[str, str]], before: float | None = None
    ) -> dict[tuple[str, str], Decimal]: ...

    async def spend_since(self, since: float | None) -> Decimal: ...

    async def session_totals(self) -> list[dict[str, Any]]: ...

    async def totals(
        self, session_id: str, group_by: str | None = None
    ) -> list[dict[str, Any]]: ...

    async def messages(
        self, session_id: str, after: int, limit: int
    ) -> tuple[list[MessageRecord], int | None]: ...

    def iter_messages(self, session_id: str) -> AsyncIterator[MessageRecord]: ...

    async def latest_message(self, session_id: str) -> MessageRecord | None: ...

    async def report(
        self,
        by: str,
        since: float | None = None,
        until: float | None = None,
        session: str | None = None,
    ) -> list[dict[str, Any]]: ...

    async def prune(
        self,
        before: float,
        keep: Collection[str] = (),
        period_start: float | None = None,
        dry_run: bool = False,
    ) -> Pruned: ...


OP_COLUMNS: dict[str, tuple[str, ...]] = {
    "message": tuple(c.sql for c in COLUMNS),
    "session": ("id", "created_at", "budget_usd", "paused", "pause_reason", "label", "updated_at"),
    "agent": ("session_id", "agent_id", "budget_usd", "paused", "pause_reason", "updated_at"),
    "global": ("budget_usd", "configured_usd", "updated_at"),
}
"""The parameters of each queued write, by name: the journal's header, the data of a
rejected row, and how an older journal's lines are read."""

_Entry = tuple[str, Sequence[Any], bool]
"""A queued write: its operation, its parameters, and whether the journal has it."""


class QueuedStore:
    """The write path both stores share (docs/reference.md §5): writes append to a
    bounded in-memory queue and to the journal, and one writer task commits them in
    batches; while the database refuses writes they stay queued and are retried with
    backoff; at shutdown what is left goes to the recovery file. A subclass says how a
    batch is written (:meth:`_write_batch`) and how the database is read."""

    def __init__(
        self,
        journal_path: Path,
        where: str,
        flush_interval: float,
        max_queue: int,
        on_drop: Callable[[int], None] | None,
        on_reject: Callable[[int], None] | None,
        on_error: Callable[[int], None] | None,
    ) -> None:
        """``journal_path``: the journal and recovery files are named after it (a
        database file, or a local name for a server's database); ``where``: the
        database as log lines name it (never with a password). ``on_drop``,
        ``on_reject``, ``on_error``: counters of writes dropped (queue full), rows
        rejected, and failed write attempts (the metrics, docs §9)."""
        self.journal_path = journal_path
        self.where = where
        self._interval = flush_interval
        self._max_queue = max_queue
        self._on_drop = on_drop
        self._on_reject = on_reject
        self._on_error = on_error
        self._pending: deque[_Entry] = deque()
        self._enqueued = 0
        """Writes ever queued; write number ``n`` has journal index ``n``."""
        self._wake = asyncio.Event()
        self._done_cond = asyncio.Condition()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._flushers = 0
        self._tries = 0  # write attempts started by the writer
        self._failed_try = 0  # the number of the last one that failed
        """Write attempts that failed (a read waiting while failing stops at the next)."""
        self._journal: journal.Journal | None = None
        self._failing: str | None = None
        """Why the database refuses writes now (None: it takes them)."""
        self._failing_since = 0.0
        self._next_fail_log = 0.0
        self._dropped = 0
        self._next_drop_log = 0.0
        self._journal_failures_logged = 0
        self._next_journal_log = 0.0
        self.rejected = 0
        """Rows the database refused since start (they are in ``rejected_rows``)."""

    # -- what each database does -------------------------------------------------------

    async def _write_batch(self) -> None:
        """Commit up to BATCH_MAX queued writes in one transaction and pop them; rows
        the database refuses go to ``rejected_rows`` (then :meth:`_rejected`); any other
        failure raises with every write still queued."""
        raise NotImplementedError

    async def _watch(self) -> None:
        """Called by the writer before each try (the SQLite file's replacement check)."""

    async def _defaults(self) -> dict[tuple[str, str], Any]:
        """The columns' defaults, for journal lines written before a column existed."""
        raise NotImplementedError

    async def _max_seq(self) -> int:
        """The highest message row number committed (counts the rows an import adds)."""
        raise NotImplementedError

    async def _abandon(self) -> None:
        """Give up an open that failed half way: nothing written, nothing deleted."""
        if self._journal is not None:
            self._journal.close(delete=not self._pending)
            self._journal = None

    def messages(
        self, session_id: str, after: int, limit: int
    ) -> Awaitable[tuple[list[MessageRecord], int | None]]:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------

    async def _start_writer(self) -> None:
        """With the database open: start the journal, import what a previous process
        left in its journal or recovery file, and start the writer."""
        try:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = journal.Journal(self.journal_path, OP_COLUMNS)
        except OSError as exc:
            await self._abandon()
            raise StoreOpenError(
                self.journal_path, f"cannot create its journal beside it ({exc.strerror})"
            ) from None
        try:
            await self._import_left_behind()
        except BaseException:
            await self._abandon()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="spendgate-writer")

    async def _stop_writer(self) -> None:
        """Let the writer commit what is queued (CLOSE_WAIT_S at most), then put what is
        still queued in the recovery file; nothing is left out without a log line saying
        how many and why."""
        self._closing = True
        if self._writer is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), CLOSE_WAIT_S)
            except TimeoutError:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writer
                self._failing = self._failing or f"not written in {CLOSE_WAIT_S:g} s"
            self._writer = None
        if self._journal is not None:
            if self._pending:
                self._save_unwritten()
            kept = self._journal.close(delete=not self._pending)
            self._journal = None
            if kept:
                log.error("journal files kept for the next start: %s", ", ".join(map(str, kept)))
        if self._dropped:
            log.error(
                "%d writes were dropped while running: the queue was full (%d) while the "
                "database refused writes", self._dropped, self._max_queue,
            )  # fmt: skip

    async def _import_left_behind(self) -> None:
        """Queue the writes a stopped process left in journals and recovery files (the
        files are kept, held by this process, until those writes are done), and write
        them now if the database takes them."""
        assert self._journal is not None
        found = []
        for f in journal.orphans(self.journal_path):
            if f.entries or f.bad_lines:
                found.append(f)
            else:  # every write in it was committed (a kill after the writer caught up)
                journal.discard(f.path, f.fd)
        if not found:
            return
        defaults = await self._defaults()
        messages = bad = 0
        for f in found:
            for e in f.entries:
                params = _normalized(e, defaults)
                if params is None:
                    bad += 1
                    continue
                messages += e.op == "message"
                self._enqueue(e.op, params, journaled=True)
            bad += f.bad_lines
            self._journal.adopt(f, self._enqueued)
        names = ", ".join(str(f.path) for f in found)
        skipped = f"; {bad} unreadable lines skipped (a write cut short)" if bad else ""
        log.warning(
            "importing %d writes (%d message rows) left in %s by a process that stopped "
            "before the database had them%s", len(self._pending), messages, names, skipped,
        )  # fmt: skip
        before, rejected = await self._max_seq(), self.rejected
        try:
            while self._pending:
                await self._write_batch()
        except Exception as exc:
            log.error(
                "database %s: cannot write the imported rows now (%s); %d writes stay "
                "queued for the writer (and in those files until written)",
                self.where, exc, len(self._pending),
            )  # fmt: skip
            return
        new = await self._max_seq() - before
        log.warning(
            "imported %s: %d new message rows, %d already stored, %d rejected",
            names, new, messages - new - (self.rejected - rejected), self.rejected - rejected,
        )  # fmt: skip

    def _save_unwritten(self) -> None:
        """At shutdown: the writes the database did not take go to the recovery file."""
        n = len(self._pending)
        rows = sum(1 for e in self._pending if e[0] == "message")
        why = self._failing or "the database did not take them"
        assert self._journal is not None
        try:
            where = journal.save_recovery(
                self.journal_path, journal.header(OP_COLUMNS), _entry_lines(self._pending)
            )
        except OSError as exc:
            in_journal = sum(1 for e in self._pending if e[2])
            log.error(
                "database %s: %d writes (%d message rows) could not be written (%s), nor "
                "saved to a recovery file (%s): %d of them are in the journal, which the "
                "next start imports; %d are lost",
                self.where, n, rows, why, exc, in_journal, n - in_journal,
            )  # fmt: skip
            return
        log.error(
            "database %s: %d writes (%d message rows) could not be written (%s); saved "
            "to %s, which the next start imports", self.where, n, rows, why, where,
        )  # fmt: skip
        self._pending.clear()

    # -- writes (never awaited by the request path) --------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def failing(self) -> str | None:
        """Why the database refuses writes now, or None."""
        return self._failing

    @property
    def _done(self) -> int:
        """Every write up to this number is committed, rejected or dropped (FIFO)."""
        return self._enqueued - len(self._pending)

    def _enqueue(self, op: str, params: Sequence[Any], journaled: bool = False) -> None:
        if len(self._pending) >= self._max_queue:
            self._drop()
        self._enqueued += 1
        jr = self._journal
        if jr is not None and not journaled:
            journaled = jr.append(self._enqueued, journal.encode(op, params))
            if not journaled:
                self._journal_failed(jr)
        self._pending.append((op, params, journaled))
        if len(self._pending) >= WAKE_AT and self._failing is None:
            self._wake.set()

    def _drop(self) -> None:
        lost = self._pending.popleft()
        self._dropped += 1
        if self._on_drop is not None:
            self._on_drop(1)
        now = time.monotonic()
        if now >= self._next_drop_log:
            self._next_drop_log = now + REPEAT_LOG_S / 3
            log.error(
                "storage queue full (%d): dropping the oldest queued %s write (%d dropped "
                "so far); the database is failing (%s)",
                self._max_queue, lost[0], self._dropped, self._failing or "too slow",
            )  # fmt: skip

    def _journal_failed(self, jr: journal.Journal) -> None:
        now = time.monotonic()
        if now >= self._next_journal_log:
            self._next_journal_log = now + REPEAT_LOG_S
            log.error(
                "journal %s: cannot append (%s): %d writes (since the last such line) are "
                "only in memory until the database has them",
                jr.paths[-1] if jr.paths else self.journal_path.parent, jr.last_error,
                jr.failures - self._journal_failures_logged,
            )  # fmt: skip
            self._journal_failures_logged = jr.failures

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is committed. While the
        database refuses writes, the writer tries once more at once and the wait is
        short (FAILING_FLUSH_S): reads answer from what the database holds."""
        target = self._enqueued
        if self._done >= target:
            return
        if self._writer is None:
            while self._done < target and self._pending:
                await self._write_batch()
            return
        first_try = self._tries + 1  # an attempt already under way may predate our rows
        failing = self._failing is not None
        if failing:  # one more attempt now, and no long wait for it
            timeout = min(timeout, FAILING_FLUSH_S)
        self._flushers += 1
        self._wake.set()
        try:
            async with self._done_cond:
                await asyncio.wait_for(
                    self._done_cond.wait_for(
                        lambda: (
                            self._done >= target
                            or (self._failing is not None and self._failed_try >= first_try)
                        )
                    ),
                    timeout,
                )
        except TimeoutError:
            if not failing:
                log.error("flush timed out with %d writes queued", len(self._pending))
        finally:
            self._flushers -= 1

    async def _notify(self) -> None:
        async with self._done_cond:
            self._done_cond.notify_all()

    async def _write_loop(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:
                await self._watch()
            except Exception:
                log.exception("database %s: checking the file failed", self.where)
            if self._pending:
                self._tries += 1
                try:
                    await self._write_batch()
                except Exception as exc:  # full disk, I/O error, locked: keep rows, retry
                    delay = await self._write_failed(exc, delay)
                    if self._closing:
                        return
                    continue
                self._write_worked()
                delay = self._interval
                if self._pending and (
                    self._closing or self._flushers or len(self._pending) >= WAKE_AT
                ):
                    self._wake.set()  # more to write at once
            if self._closing and not self._pending:
                return

    async def _write_failed(self, exc: Exception, delay: float) -> float:
        self._failed_try = self._tries
        if self._on_error is not None:
            self._on_error(1)
        now = time.monotonic()
        first = self._failing is None
        self._failing = f"{type(exc).__name__}: {exc}"
        if first:
            self._failing_since = now
        if first or now >= self._next_fail_log:
            self._next_fail_log = now + REPEAT_LOG_S
            log.error(
                "database %s: cannot write (%s)%s; %d writes queued (%d message rows; at "
                "most %d are kept, then the oldest are dropped), retried every %g s at "
                "most; reads answer from what is stored",
                self.where, self._failing,
                "" if first else f" for {now - self._failing_since:.0f} s",
                len(self._pending), sum(1 for e in self._pending if e[0] == "message"),
                self._max_queue, min(delay * 2, 5.0),
            )  # fmt: skip
        await self._notify()  # flushes waiting for this batch stop waiting
        return min(delay * 2, 5.0)

    def _write_worked(self) -> None:
        if self._failing is not None:
            log.warning(
                "database %s: writes work again after %.1f s (%s)",
                self.where, time.monotonic() - self._failing_since, self._failing,
            )  # fmt: skip
            self._failing = None

    async def _committed(self, n: int, rejected: list[tuple[str, str, Sequence[Any]]]) -> None:
        """The first ``n`` queued writes are committed (``rejected`` of them set aside):
        off the queue and the journal, and the flushes waiting for them wake."""
        for _ in range(n):
            self._pending.popleft()
        if rejected:
            self._rejected(rejected)
        if self._journal is not None:
            self._journal.release(self._done)
        await self._notify()

    def _rejected(self, rejected: list[tuple[str, str, Sequence[Any]]]) -> None:
        self.rejected += len(rejected)
        if self._on_reject is not None:
            self._on_reject(len(rejected))
        op, why, params = rejected[0]
        what = f"{op} {params[0]!r}" if params else op
        log.warning(
            "database %s refused %d rows (first: %s: %s); they are in rejected_rows, "
            "every other row was written", self.where, len(rejected), what, why,
        )  # fmt: skip

    async def iter_messages(self, session_id: str) -> AsyncIterator[MessageRecord]:
        """All rows of a session in pages, so an export holds one page in memory at a time."""
        after = 0
        while True:
            page, cursor = await self.messages(session_id, after, 1000)
            for m in page:
                yield m
            if cursor is None:
                return
            after = cursor


class SQLiteStore(QueuedStore):
    def __init__(
        self,
        path: Path,
        flush_interval: float = 0.2,
        max_queue: int = 200_000,
        on_drop: Callable[[int], None] | None = None,
        on_reject: Callable[[int], None] | None = None,
        on_error: Callable[[int], None] | None = None,
        watch_interval: float = WATCH_S,
        lock_wait: float = OPEN_BUSY_S,
    ) -> None:
        """See :class:`QueuedStore` for the rest. ``watch_interval``: how often the file
        is checked (WATCH_S); ``lock_wait``: how long the open waits for another
        process's lock (OPEN_BUSY_S)."""
        super().__init__(path, str(path), flush_interval, max_queue, on_drop, on_reject, on_error)
        self.path = path
        self._watch_interval = watch_interval
        self._lock_wait = lock_wait
        self._db: aiosqlite.Connection | None = None
        self._tx = asyncio.Lock()
        """Held from BEGIN to COMMIT/ROLLBACK: reads that must see only committed rows wait."""
        self._totals: dict[str, dict[str, Any]] = {}
        self._totals_seq = 0
        """``_totals`` holds every row up to this ``seq``."""
        self._file_ids: dict[str, tuple[int, int] | None] = {}
        """(device, inode) of the database file and of its -wal and -shm, when opened."""
        self._next_watch = 0.0
        self._rescue: Path | None = None
        """A copy of a deleted database file not yet put in its place."""

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, start_writer: bool = True) -> None:
        """Open (creating or migrating) the database. With ``start_writer`` (the proxy):
        check the file, import what a previous process left in its journal or recovery
        file, and start the writer and the journal. :class:`StoreOpenError` if the
        database cannot be used, saying why."""
        self._db = await self._open_db(check=start_writer)
        if not start_writer:
            return
        await self._start_writer()

    async def _abandon(self) -> None:
        """Give up an open that failed half way: nothing written, nothing deleted."""
        await super()._abandon()
        if self._db is not None:
            await _close_quietly(self._db)
            self._db = None

    async def _open_db(self, check: bool) -> aiosqlite.Connection:
        path = self.path
        _preflight(path)
        try:
            db = await _connect(path, 0)  # a lock is waited for here, where a signal can stop it
        except sqlite3.Error as exc:
            raise StoreOpenError(path, _problem(exc)) from None
        deadline = time.monotonic() + self._lock_wait
        try:
            mode = await _patiently(db, deadline, "PRAGMA journal_mode=WAL")
            if str(mode).lower() != "wal":
                raise StoreOpenError(path, f"cannot use WAL journal mode (it stays {mode!r})")
            await db.execute("PRAGMA synchronous=NORMAL")
            if check:
                await self._quick_check(db)
                deadline = max(deadline, time.monotonic() + 0.25)  # a few tries after it
                await _patiently(db, deadline, "BEGIN IMMEDIATE")  # can it be written at all?
                await db.execute("ROLLBACK")
            await self._migrate(db, deadline)
            await _patiently(db, deadline, _SANE_ROW)
            await db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        except BaseException as exc:
            await _close_quietly(db)
            if isinstance(exc, sqlite3.Error):
                raise StoreOpenError(path, _problem(exc, self._lock_wait)) from None
            raise
        self._file_ids = {
            suffix: _file_id(path.with_name(path.name + suffix)) for suffix in ("", "-wal", "-shm")
        }
        return db

    async def _quick_check(self, db: aiosqlite.Connection) -> None:
        """Damaged pages are refused at start-up; the check is bounded in time. Two
        stops: a progress handler (between the statement's steps, such as its per-row
        NOT NULL checks) and ``sqlite3_interrupt`` at the deadline (inside the b-tree
        walk, which is one step)."""
        deadline = time.monotonic() + QUICK_CHECK_S
        stopped = False

        def progress() -> int:
            nonlocal stopped
            stopped = stopped or time.monotonic() > deadline
            return int(stopped)

        async def interrupt_at_deadline() -> None:
            nonlocal stopped
            await asyncio.sleep(QUICK_CHECK_S)
            stopped = True
            await db.interrupt()

        await db.set_progress_handler(progress, 1000)
        timer = asyncio.create_task(interrupt_at_deadline())
        try:
            async with db.execute("PRAGMA quick_check(5)") as cur:
                rows = [str(r[0]) for r in await cur.fetchall()]
        except sqlite3.OperationalError:
            if not stopped:
                raise
            size = self.path.stat().st_size / 1e6
            log.warning(
                "database %s: quick_check stopped after %g s (%.0f MB): not every page checked",
                self.path, QUICK_CHECK_S, size,
            )  # fmt: skip
            return
        finally:
            timer.cancel()
            await db.set_progress_handler(lambda: 0, 0)  # n 0: no handler
        if rows != ["ok"]:
            found = " ".join(" ".join(rows).split()).replace("*** in database main *** ", "")
            raise StoreOpenError(self.path, f"the file is damaged (quick_check: {found})")

    async def _migrate(self, db: aiosqlite.Connection, deadline: float) -> None:
        version = int(await _patiently(db, deadline, "PRAGMA user_version") or 0)
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            script = f"BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {number}; COMMIT;"
            await _patiently(db, deadline, script, script=True)
            log.info("database %s migrated to schema version %d", self.path, number)

    async def _defaults(self) -> dict[tuple[str, str], Any]:
        """The columns' defaults, for journal lines written before a column existed."""
        out: dict[tuple[str, str], Any] = {}
        async with self.db.execute("PRAGMA table_info(token_usage)") as cur:
            for r in await cur.fetchall():
                if r["dflt_value"] is not None:
                    async with self.db.execute(f"SELECT {r['dflt_value']}") as value:
                        found = await value.fetchone()
                    out["message", r["name"]] = found[0] if found else None
        return out

    async def _max_seq(self) -> int:
        async with self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM token_usage") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        """Write everything queued, then close (called on shutdown, SIGINT/SIGTERM).
        What the database does not take in time goes to the recovery file; nothing is
        left out without a log line saying how many and why."""
        await self._stop_writer()
        if self._db is not None:
            with contextlib.suppress(Exception):  # one self-contained file left behind
                await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await _close_quietly(self._db)
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    def add_message(self, message: MessageRecord) -> None:
        self._enqueue("message", _message_params(message))

    def save_session(self, session: SessionRecord) -> None:
        self._enqueue("session", _session_params(session))

    def save_agent_budget(self, agent: AgentBudgetRecord) -> None:
        self._enqueue("agent", _agent_params(agent))

    def save_global_budget(self, budget: GlobalBudgetRecord) -> None:
        self._enqueue("global", _global_params(budget))

    async def _write_batch(self) -> None:
        """Commit up to BATCH_MAX queued writes in one transaction. Rows the database
        refuses go to ``rejected_rows``; any other failure rolls back and raises, with
        every write still queued."""
        if not self._pending:
            return
        n = min(len(self._pending), BATCH_MAX)
        batch = list(itertools.islice(self._pending, n))
        rejected: list[tuple[str, str, Sequence[Any]]] = []
        db = self.db
        async with self._tx:
            try:
                await db.execute("BEGIN")
                for op, sql in _UPSERTS.items():
                    params = [p for o, p, _ in batch if o == op]
                    if params:
                        try:
                            await db.executemany(sql, params)
                        except Exception as exc:
                            if not is_row_error(exc):
                                raise
                            await _one_by_one(db, op, sql, params, rejected)
                messages = [p for o, p, _ in batch if o == "message"]
                for sql, flat, rows in _insert_chunks(messages):
                    try:
                        await db.execute(sql, flat)
                    except Exception as exc:
                        if not is_row_error(exc):
                            raise
                        await _one_by_one(db, "message", _insert_messages(1), rows, rejected)
                if rejected:
                    now = time.time()
                    await db.executemany(
                        _INSERT_REJECTED,
                        [(now, op, why, _rejected_data(op, p)) for op, why, p in rejected],
                    )
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(Exception):
                        await db.execute("ROLLBACK")
                raise
        await self._committed(n, rejected)

    # -- the file deleted or replaced while running ------------------------------------------

    async def _watch(self) -> None:
        """At most every WATCH_S: is the file at the path still the one we have open?
        And the journal's?"""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + self._watch_interval
        jr = self._journal
        if jr is not None and not jr.intact():
            log.error(
                "journal %s was deleted while running: a new one takes the %d writes "
                "not yet committed", jr.paths[-1], len(self._pending),
            )  # fmt: skip
            base = self._done + 1
            ok = jr.restart(
                (base + i, journal.encode(op, p)) for i, (op, p, _) in enumerate(self._pending)
            )
            self._pending = deque((op, p, ok) for op, p, _ in self._pending)
        if self._rescue is not None:
            async with self._tx:
                await self._replace_file(self._rescue)
            return
        seen = _file_id(self.path)
        if seen == self._file_ids.get("") or not self._file_ids:
            return
        what = "deleted" if seen is None else "replaced by another file"
        log.error(
            "database %s was %s while spendgate was running: every row written since "
            "went into a file no one can open again; recreating it from what the open "
            "connection still reads", self.path, what,
        )  # fmt: skip
        rescue = self.path.with_name(f"{self.path.name}.rescue-{os.urandom(4).hex()}")
        async with self._tx:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                target = sqlite3.connect(rescue, check_same_thread=False)
                try:
                    await self.db.backup(target)
                finally:
                    target.close()
            except Exception as exc:
                with contextlib.suppress(OSError):
                    rescue.unlink()
                log.error(
                    "database %s: could not copy what the deleted file holds (%s); "
                    "trying again in %g s", self.path, exc, self._watch_interval,
                )  # fmt: skip
                return
            await _close_quietly(self.db)
            self._db = None
            for suffix in ("-wal", "-shm"):  # the old file's, if still at the path
                side = self.path.with_name(self.path.name + suffix)
                if _file_id(side) is not None and _file_id(side) == self._file_ids.get(suffix):
                    with contextlib.suppress(OSError):
                        side.unlink()
            self._rescue = rescue
            await self._replace_file(rescue)

    async def _replace_file(self, rescue: Path) -> None:
        """Put the copy of the lost file in its place (or, if another database now
        stands there, merge the copy into it) and reopen."""
        path = self.path
        merge = path.exists() and rescue.exists()  # else the copy is in place already
        try:
            if not merge and rescue.exists():
                os.replace(rescue, path)
            try:
                db = await self._open_db(check=False)
            except StoreOpenError as exc:
                if not merge:
                    raise
                aside = path.with_name(f"{path.name}.replaced-{int(time.time())}")
                log.error("database %s: the file now there is unusable (%s); moved to %s",
                          path, exc.problem, aside)  # fmt: skip
                os.replace(path, aside)
                os.replace(rescue, path)
                merge = False
                db = await self._open_db(check=False)
        except Exception as exc:
            log.error(
                "database %s: cannot reopen (%s); the copy is kept in %s, %d writes stay "
                "queued; trying again in %g s",
                path, exc, rescue, len(self._pending), self._watch_interval,
            )  # fmt: skip
            return
        self._db = db
        self._rescue = None
        self._totals, self._totals_seq = {}, 0  # seq numbers of another file
        if merge:
            try:
                await _merge(db, rescue)
            except Exception as exc:
                log.error(
                    "database %s: the file now there is used; merging what the lost one "
                    "held failed (%s): that is kept in %s", path, exc, rescue,
                )  # fmt: skip
                return
            with contextlib.suppress(OSError):
                rescue.unlink()
        done = "now holds the rows of the lost file too" if merge else "recreated with every row"
        log.error("database %s %s; %d queued writes go to it", path, done, len(self._pending))
        self._wake.set()

    # -- reads ---------------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def load_sessions(self) -> list[SessionRecord]:
        return [_session_from_row(r) for r in await self._fetchall("SELECT * FROM sessions")]

    async def load_agent_budgets(self) -> list[AgentBudgetRecord]:
        rows = await self._fetchall("SELECT * FROM agent_budgets")
        return [
            AgentBudgetRecord(
                r["session_id"], r["agent_id"], _money(r["budget_usd"]), bool(r["paused"]),
                r["pause_reason"],
            )
            for r in rows
        ]  # fmt: skip

    async def load_global_budget(self) -> GlobalBudgetRecord | None:
        rows = await self._fetchall("SELECT * FROM global_budget")
        if not rows:
            return None
        r = rows[0]
        return GlobalBudgetRecord(_money(r["budget_usd"]), configured=_money(r["configured_usd"]))

    async def agent_spend(
        self, agents: Iterable[tuple[str, str]], before: float | None = None
    ) -> dict[tuple[str, str], Decimal]:
        """What these (session, agent) pairs have spent, on messages started before
        ``before`` (None: ever). One query per pair, each read through the session index:
        only agents with a budget are asked for (a GROUP BY over every row took 9.8 s on
        2,000,000 rows)."""
        await self.flush()
        out: dict[tuple[str, str], Decimal] = {}
        limit = before if before is not None else float("inf")
        for sid, agent in agents:
            rows = await self._fetchall(
                f"SELECT ROUND(SUM(cost_usd), {COST_DIGITS}) FROM token_usage "
                "WHERE session_id = ? AND agent_id = ? AND started_at < ?",
                (sid, agent, limit),
            )
            out[(sid, agent)] = _money(rows[0][0]) or Decimal(0)
        return out

    async def spend_since(self, since: float | None) -> Decimal:
        """All sessions' spend on messages started at or after ``since`` (None: ever)."""
        await self.flush()
        rows = await self._fetchall(
            f"SELECT ROUND(SUM(cost_usd), {COST_DIGITS}) FROM token_usage WHERE started_at >= ?",
            (since if since is not None else float("-inf"),),
        )
        return _money(rows[0][0]) or Decimal(0)

    async def spend_by_session(self) -> dict[str, Decimal]:
        await self.flush()
        async with self._tx:
            await self._add_new_rows()
        return {sid: _money(_cost(t["cost_usd"])) or Decimal(0) for sid, t in self._totals.items()}

    async def session_totals(self) -> list[dict[str, Any]]:
        """Every session row with its message totals, newest activity first.

        The totals are kept between calls and brought up to date from the rows added
        since (``seq`` only grows), so a call reads the new rows, not the whole table.
        """
        await self.flush()
        async with self._tx:  # the sessions as committed with those rows
            await self._add_new_rows()
            sessions = await self._fetchall("SELECT * FROM sessions")
        out = []
        for s in sessions:
            tot = self._totals.get(s["id"], _NO_TOTALS)
            out.append({**dict(s), **tot, "cost_usd": _cost(tot["cost_usd"])})
        out.sort(key=lambda r: r["last_at"] or r["created_at"], reverse=True)
        return out

    async def _add_new_rows(self) -> None:
        """Add the rows committed since the last call to ``_totals``. Call it holding
        ``_tx``, so only committed rows are read: a batch rolled back is never counted."""
        new = await self._fetchall(
            f"SELECT session_id, MAX(seq) AS max_seq, {_TOTALS} FROM token_usage "
            "WHERE seq > ? GROUP BY +session_id",  # +: read by seq, not the session index
            (self._totals_seq,),
        )
        for r in new:
            _add_totals(self._totals.setdefault(r["session_id"], dict(_NO_TOTALS)), r)
            self._totals_seq = max(self._totals_seq, r["max_seq"])

    async def totals(self, session_id: str, group_by: str | None = None) -> list[dict[str, Any]]:
        """Token and cost sums for a session, optionally per ``model`` or ``agent_id``
        (``_TOTALS``: the priced rows' cost and how many rows are unpriced)."""
        await self.flush()
        if group_by not in (None, "model", "agent_id"):
            raise ValueError(group_by)
        key = f"{group_by} AS key, " if group_by else ""
        tail = f" GROUP BY {group_by} ORDER BY {group_by}" if group_by else ""
        rows = await self._fetchall(
            f"SELECT {key}{_TOTALS} FROM token_usage WHERE session_id = ?{tail}", (session_id,)
        )
        return [dict(r) for r in rows]

    async def messages(
        self, session_id: str, after: int, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        await self.flush()
        rows = await self._fetchall(
            f"SELECT {_SELECT_COLUMNS}, seq FROM token_usage WHERE session_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (session_id, after, limit + 1),
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return [_message_from_row(r) for r in rows], (rows[-1]["seq"] if more else None)

    async def latest_message(self, session_id: str) -> MessageRecord | None:
        await self.flush()
        rows = await self._fetchall(
            f"SELECT {_SELECT_COLUMNS} FROM token_usage WHERE session_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (session_id,),
        )
        return _message_from_row(rows[0]) if rows else None

    async def report(
        self,
        by: str,
        since: float | None = None,
        until: float | None = None,
        session: str | None = None,
    ) -> list[dict[str, Any]]:
        """Totals of the rows started in ``[since, until)`` (None: unbounded), of one
        ``session`` or all, per ``by`` (:data:`REPORT_BY`; time keys in UTC), sorted by
        key (null last). Each row: ``key``, ``message_count``, ``input_tokens``,
        ``output_tokens``, ``cached_input_tokens``, ``cost_usd`` (a Decimal, the priced
        rows' sum rounded to COST_DIGITS; None when no row is priced),
        ``unpriced_message_count``; with ``by="session"`` also its ``label``."""
        sql, params = _report_sql(by, since, until, session)
        await self.flush()
        out = []
        for r in await self._fetchall(sql, params):
            row = dict(r)
            row["cost_usd"] = _money(row["cost_usd"])
            out.append(row)
        return out

    async def prune(
        self,
        before: float,
        keep: Collection[str] = (),
        period_start: float | None = None,
        dry_run: bool = False,
    ) -> Pruned:
        """Remove the sessions whose last message (or, without messages, creation) is
        before ``before``, except ``keep``: their rows, agent budgets and session rows,
        in one transaction (``dry_run``: only say what that would remove). Sessions are
        chosen from the running totals, so no scan of the rows is needed."""
        await self.flush()
        async with self._tx:
            await self._add_new_rows()
            created = {
                r["id"]: r["created_at"]
                for r in await self._fetchall("SELECT id, created_at FROM sessions")
            }
            chosen: list[str] = []
            kept: list[str] = []
            for sid in set(created) | set(self._totals):
                last = self._totals.get(sid, _NO_TOTALS)["last_at"]
                last = created.get(sid) if last is None else last
                if last is not None and last < before:
                    (kept if sid in keep else chosen).append(sid)
            chosen.sort()
            kept.sort()
            messages = sum(self._totals.get(s, _NO_TOTALS)["message_count"] for s in chosen)
            spend = Decimal(0)
            start = float("-inf") if period_start is None else period_start
            for part in _parts(chosen):
                marks = ", ".join("?" * len(part))
                rows = await self._fetchall(
                    f"SELECT ROUND(SUM(cost_usd), {COST_DIGITS}) FROM token_usage "
                    f"WHERE session_id IN ({marks}) AND started_at >= ?",
                    (*part, start),
                )
                spend += _money(rows[0][0]) or Decimal(0)
            if dry_run or not chosen:
                return Pruned(chosen, messages, spend, kept)
            db = self.db
            try:
                await db.execute("BEGIN")
                for part in _parts(chosen):
                    marks = ", ".join("?" * len(part))
                    for table, column in _PRUNED:
                        await db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", part)
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(Exception):
                        await db.execute("ROLLBACK")
                raise
            for sid in chosen:
                self._totals.pop(sid, None)
        log.warning(
            "database %s: removed %d sessions (%d message rows) last active before %s",
            self.path, len(chosen), messages, _iso_bound(before),
        )  # fmt: skip
        return Pruned(chosen, messages, spend, kept)


_PRUNED = (("token_usage", "session_id"), ("agent_budgets", "session_id"), ("sessions", "id"))
"""What removing a session deletes, in this order."""
PRUNE_PART = 500
"""Session ids per statement when removing sessions (SQLite binds at most 32,766)."""


def _parts(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), PRUNE_PART):
        yield ids[i : i + PRUNE_PART]


def _normalized(e: journal.Entry, defaults: dict[tuple[str, str], Any]) -> Sequence[Any] | None:
    """A journal line's values in today's column order (None: an unknown operation).
    A column the line lacks (written by an older version) takes its default."""
    current = OP_COLUMNS.get(e.op)
    if current is None:
        return None
    if tuple(e.columns) == current and len(e.values) == len(current):
        return e.values
    row = dict(zip(e.columns, e.values, strict=False))
    return [row.get(c, defaults.get((e.op, c))) for c in current]


async def _one_by_one(
    db: aiosqlite.Connection,
    op: str,
    sql: str,
    rows: Sequence[Sequence[Any]],
    rejected: list[tuple[str, str, Sequence[Any]]],
) -> None:
    """Write ``rows`` one statement each; those the database refuses go to ``rejected``."""
    for params in rows:
        try:
            await db.execute(sql, params)
        except Exception as exc:
            if not is_row_error(exc):
                raise
            rejected.append((op, f"{type(exc).__name__}: {exc}", params))


def _rejected_data(op: str, params: Sequence[Any]) -> str:
    names = OP_COLUMNS.get(op, ())
    data = {
        names[i] if i < len(names) else str(i): journal.jsonable(v) for i, v in enumerate(params)
    }
    return json.dumps(data)


_MERGED = {
    "token_usage": "INSERT OR IGNORE",
    "sessions": "INSERT OR REPLACE",
    "agent_budgets": "INSERT OR REPLACE",
    "global_budget": "INSERT OR REPLACE",
    "rejected_rows": "INSERT",
}
"""How the rows of a lost file join the file that replaced it: messages by id (kept
once), budgets as the running proxy had them, rejected rows all."""
_RENUMBERED = {"token_usage": {"seq"}, "rejected_rows": {"id"}}
"""Row numbers the file they join gives anew."""


async def _merge(db: aiosqlite.Connection, rescue: Path) -> None:
    async def columns(schema: str, table: str) -> list[str]:
        async with db.execute(f"PRAGMA {schema}.table_info({table})") as cur:
            return [r["name"] for r in await cur.fetchall()]

    await db.execute("ATTACH DATABASE ? AS rescue", (str(rescue),))
    try:
        await db.execute("BEGIN")
        await db.execute("DROP TRIGGER IF EXISTS token_usage_sane")  # copy what it holds
        for table, verb in _MERGED.items():
            own = set(await columns("main", table)) - _RENUMBERED.get(table, set())
            names = ", ".join(c for c in await columns("rescue", table) if c in own)
            if not names:
                continue
            order = " ORDER BY seq" if table == "token_usage" else ""
            await db.execute(
                f"{verb} INTO main.{table} ({names}) SELECT {names} FROM rescue.{table}{order}"
            )
        await db.execute(_SANE_ROW)
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise
    finally:
        await db.execute("DETACH DATABASE rescue")
