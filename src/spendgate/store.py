"""The storage seam and its SQLite implementation (docs/reference.md §5).

The request path never waits for the disk: ``add_message``/``save_session`` only append
to an in-memory queue, and a single writer task commits batches on a short interval.
Reads call ``flush()`` first, so every API read reflects every finished request.
If the database is locked or the disk is full, batches are retried with backoff and
the queue (bounded) keeps them; only past that bound are rows dropped, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from decimal import Decimal
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from spendgate.records import (
    COLUMNS,
    FLAG,
    MONEY,
    STORED_FIELDS,
    VALUE,
    AgentBudgetRecord,
    GlobalBudgetRecord,
    MessageRecord,
    SessionRecord,
)

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
)

COST_DIGITS = 10
"""Sums of REAL costs are rounded to 1e-10 USD: far below any price step, and it removes
binary float noise (0.010000000000000002 → 0.01)."""

_INSERT_COLUMNS = ", ".join(c.sql for c in COLUMNS)
_SELECT_COLUMNS = ", ".join(c.sql for c in STORED_FIELDS)
"""A SELECT of these yields a row in :class:`MessageRecord`'s field order."""
_MESSAGE_ROW = f"({', '.join('?' * len(COLUMNS))})"
INSERT_CHUNK = 256
"""Rows per INSERT statement. One multi-row statement binds all its parameters in one C
call and runs one step without the GIL, where ``executemany`` hands the GIL back and
forth twice per row, which costs the event loop thread more than the insert itself."""


@functools.lru_cache(maxsize=16)
def _insert_messages(rows: int) -> str:
    values = ", ".join([_MESSAGE_ROW] * rows)
    return f"INSERT OR IGNORE INTO token_usage ({_INSERT_COLUMNS}) VALUES {values}"


def _insert_chunks(rows: list[Sequence[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """``rows`` as a few multi-row INSERTs: full chunks, then the rest in powers of two
    (so at most a dozen distinct statements are ever prepared and cached)."""
    i, n = 0, len(rows)
    size = INSERT_CHUNK
    while i < n:
        while size > n - i:
            size //= 2
        flat: list[Any] = []
        for row in rows[i : i + size]:
            flat.extend(row)
        yield _insert_messages(size), flat
        i += size


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


def _message_params(m: MessageRecord) -> Sequence[Any]:
    """The INSERT parameters of one row, in ``COLUMNS`` order (on the request path)."""
    values = _message_values(m)
    if not _MONEY_AT:
        return values
    params = list(values)
    for i in _MONEY_AT:
        if params[i] is not None:
            params[i] = float(params[i])
    return params


_DECODE: dict[str, Callable[[Any], Any] | None] = {VALUE: None, FLAG: bool, MONEY: _money}
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
    """What the proxy and API need from storage; a PostgreSQL store can slot in."""

    @property
    def queue_depth(self) -> int: ...

    def add_message(self, message: MessageRecord) -> None: ...

    def save_session(self, session: SessionRecord) -> None: ...

    def save_agent_budget(self, agent: AgentBudgetRecord) -> None: ...

    def save_global_budget(self, budget: GlobalBudgetRecord) -> None: ...

    async def flush(self) -> None: ...

    async def load_sessions(self) -> list[SessionRecord]: ...

    async def load_agent_budgets(self) -> list[AgentBudgetRecord]: ...

    async def load_global_budget(self) -> GlobalBudgetRecord | None: ...

    async def spend_by_session(self) -> dict[str, Decimal]: ...

    async def spend_by_agent(self) -> dict[tuple[str, str], Decimal]: ...

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


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        flush_interval: float = 0.2,
        max_queue: int = 200_000,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self._interval = flush_interval
        self._max_queue = max_queue
        self._on_drop = on_drop
        self._db: aiosqlite.Connection | None = None
        self._pending: deque[tuple[str, Sequence[Any]]] = deque()
        self._enqueued = 0
        self._committed = 0
        self._wake = asyncio.Event()
        self._committed_cond = asyncio.Condition()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._tx = asyncio.Lock()
        """Held from BEGIN to COMMIT/ROLLBACK: reads that must see only committed rows wait."""
        self._totals: dict[str, dict[str, Any]] = {}
        self._totals_seq = 0
        """``_totals`` holds every row up to this ``seq``."""

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, start_writer: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, timeout=5.0, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        await self._migrate(db)
        self._db = db
        if start_writer:
            self._writer = asyncio.create_task(self._write_loop(), name="spendgate-writer")

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
            log.info("database %s migrated to schema version %d", self.path, number)

    async def close(self) -> None:
        """Write everything queued, then close (called on shutdown, SIGINT/SIGTERM)."""
        self._closing = True
        if self._writer is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._writer, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                log.error("gave up writing %d queued rows at shutdown", len(self._pending))
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # -- writes (never awaited by the request path) --------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def _enqueue(self, op: str, params: Sequence[Any]) -> None:
        if len(self._pending) >= self._max_queue:
            lost = self._pending.popleft()
            log.error(
                "storage queue full (%d): dropping a queued %s write; the database is failing",
                self._max_queue,
                lost[0],
            )
            if self._on_drop is not None:
                self._on_drop(1)
        self._pending.append((op, params))
        self._enqueued += 1
        if len(self._pending) >= 500:
            self._wake.set()

    def add_message(self, message: MessageRecord) -> None:
        self._enqueue("message", _message_params(message))

    def save_session(self, session: SessionRecord) -> None:
        self._enqueue("session", _session_params(session))

    def save_agent_budget(self, agent: AgentBudgetRecord) -> None:
        self._enqueue("agent", _agent_params(agent))

    def save_global_budget(self, budget: GlobalBudgetRecord) -> None:
        self._enqueue("global", _global_params(budget))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is committed."""
        target = self._enqueued
        if self._committed >= target:
            return
        if self._writer is None:
            await self._write_batch()
            return
        self._wake.set()
        async with self._committed_cond:
            try:
                await asyncio.wait_for(
                    self._committed_cond.wait_for(lambda: self._committed >= target), timeout
                )
            except TimeoutError:
                log.error("flush timed out with %d rows queued", len(self._pending))

    async def _write_loop(self) -> None:
        backoff = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._pending:
                try:
                    await self._write_batch()
                    backoff = self._interval
                except Exception as exc:  # locked, disk full, I/O error: keep rows, retry
                    log.error(
                        "database write failed (%s); %d rows kept for retry",
                        exc,
                        len(self._pending),
                    )
                    backoff = min(backoff * 2, 5.0)
                    if self._closing and backoff >= 5.0:
                        return
                    await asyncio.sleep(backoff)
                    continue
            if self._closing and not self._pending:
                return

    async def _write_batch(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        messages = [p for op, p in batch if op == "message"]
        db = self.db
        async with self._tx:
            try:
                await db.execute("BEGIN")
                for op, sql in _UPSERTS.items():
                    params = [p for o, p in batch if o == op]
                    if params:
                        await db.executemany(sql, params)
                for sql, params in _insert_chunks(messages):
                    await db.execute(sql, params)
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
        for _ in batch:
            self._pending.popleft()
        self._committed += len(batch)
        async with self._committed_cond:
            self._committed_cond.notify_all()

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

    async def spend_by_agent(self) -> dict[tuple[str, str], Decimal]:
        """What each agent of each session has spent (agent budgets, after a restart)."""
        await self.flush()
        rows = await self._fetchall(
            f"SELECT session_id, agent_id, ROUND(SUM(cost_usd), {COST_DIGITS}) AS cost "
            "FROM token_usage WHERE agent_id IS NOT NULL GROUP BY session_id, agent_id"
        )
        return {(r[0], r[1]): _money(r[2]) or Decimal(0) for r in rows}

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

    async def latest_message(self, session_id: str) -> MessageRecord | None:
        await self.flush()
        rows = await self._fetchall(
            f"SELECT {_SELECT_COLUMNS} FROM token_usage WHERE session_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (session_id,),
        )
        return _message_from_row(rows[0]) if rows else None
