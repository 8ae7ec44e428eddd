"""The PostgreSQL store (docs/reference.md §5 "PostgreSQL"): rows of several replicas in
one database.

The write path is the SQLite store's (:class:`~spendgate.store.QueuedStore`): the
request path only enqueues, a writer commits batches, a database that is down keeps
the rows queued (bounded, journaled) and retried, and what is left at shutdown goes to
the recovery file. What differs is how a batch is written and read:

- **One statement per batch.** The batch's rows go in as one parameter, a JSON array
  of rows (orjson, money as decimal strings), which the server decodes and types
  (``jsonb_array_elements``: :func:`_rows_from_json`); ``ON CONFLICT (id) DO NOTHING``
  ignores a row already stored, and the same statement adds the rows it did insert to
  ``session_totals``, so a session's totals equal the sum of its rows with any number
  of writers (a duplicate adds nothing). A batch the database refuses is undone (its
  transaction rolled back) and written again, each statement in a savepoint and the
  refused one's rows one by one, each checked and typed here first (:func:`_typed`,
  whose reason a bad value gets); a row refused goes to ``rejected_rows``. A batch
  nobody refuses pays no savepoint.
- **Commit order.** Each batch takes one transaction-scoped advisory lock before it
  writes (with its ``BEGIN``, one round trip), so the batches of every replica commit
  one at a time and ``token_usage.seq`` grows in commit order: a reader that has seen
  ``seq`` N will never later find a row below N (the message cursor ``seq > after``
  skips nothing). A batch holds the lock for milliseconds (bench/results.md).
- **Money is NUMERIC**, written from the ``Decimal``'s exact string and read back as a
  ``Decimal``:
  the sums are exact and are rounded to ``COST_DIGITS`` as the SQLite store's are.
- **Schema** from :data:`spendgate.records.COLUMNS` (each column's type from the
  :class:`MessageRecord` field's): created, migrated, and given any column a newer
  version added, all under an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import time
import types
import typing
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, import-not-found, unused-ignore]
import orjson

from spendgate.records import (
    COLUMNS,
    FLAG,
    MONEY,
    STORED_FIELDS,
    AgentBudgetRecord,
    GlobalBudgetRecord,
    MessageRecord,
    Pruned,
    SessionRecord,
)
from spendgate.store import (
    BATCH_MAX,
    COST_DIGITS,
    COST_LIMIT,
    OP_COLUMNS,
    TOKEN_LIMIT,
    QueuedStore,
    StoreOpenError,
    _rejected_data,
    message_encoder,
)
from spendgate.store_factory import safe_url
from spendgate.timespec import iso_bound

_PRUNED = (
    ("token_usage", "session_id"),
    ("agent_budgets", "session_id"),
    ("session_totals", "session_id"),
    ("sessions", "id"),
)
"""What removing a session deletes (the SQLite store's list, and the kept totals)."""

log = logging.getLogger("spendgate.store")

MIGRATE_LOCK = 0x5E9D_0001
"""The advisory lock held while the schema is created or changed."""
WRITE_LOCK = 0x5E9D_0002
"""The advisory lock each batch holds from its first write to its commit."""
CONNECT_TIMEOUT_S = 5.0
"""How long opening a connection may take (start-up fails after it, saying why)."""
COMMAND_TIMEOUT_S = 30.0
"""The longest one statement may run before the batch counts as failed and is retried."""
POOL_SIZE = 4
"""Connections per process: the writer's, and a few for reads."""

_PG_TYPES: dict[Any, str] = {
    bool: "BOOLEAN",
    int: "BIGINT",
    float: "DOUBLE PRECISION",
    str: "TEXT",
    Decimal: "NUMERIC",
}


@dataclasses.dataclass(frozen=True)
class _Col:
    name: str
    type: str
    nullable: bool
    default: Any = None
    """A Python value, for a column added to an existing table (None: no default)."""

    def ddl(self, adding: bool = False) -> str:
        sql = f"{self.name} {self.type}"
        if self.default is not None:
            sql += f" DEFAULT {_literal(self.default)}"
        if not self.nullable and (not adding or self.default is not None):
            sql += " NOT NULL"
        return sql


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float, Decimal)):
        return repr(value) if not isinstance(value, Decimal) else str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _column(name: str, hint: Any, kind: str | None = None, default: Any = None) -> _Col:
    """A column from a record field's type (``X | None``: nullable)."""
    args = typing.get_args(hint)
    nullable = type(None) in args
    if isinstance(hint, types.UnionType) or args:
        bases = [a for a in args if a is not type(None)]
        hint = bases[0] if len(bases) == 1 else None
    if kind == MONEY:
        hint = Decimal
    elif kind == FLAG:
        hint = bool
    sql = _PG_TYPES.get(hint)
    if sql is None:
        raise TypeError(f"store_postgres: no PostgreSQL type for column {name} ({hint!r})")
    return _Col(name, sql, nullable, default)


def _defaults_of(record: type) -> dict[str, Any]:
    fields = dataclasses.fields(record)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def _record_columns(record: type, names: Sequence[str], rename: dict[str, str]) -> list[_Col]:
    hints = typing.get_type_hints(record)
    defaults = _defaults_of(record)
    out = []
    for name in names:
        attr = rename.get(name, name)
        if name == "updated_at":
            out.append(_Col(name, "DOUBLE PRECISION", True))
        else:
            out.append(_column(name, hints[attr], default=defaults.get(attr)))
    return out


def _message_columns() -> list[_Col]:
    hints = typing.get_type_hints(MessageRecord)
    defaults = _defaults_of(MessageRecord)
    out = []
    for c in COLUMNS:
        if c.derived:
            hint = typing.get_type_hints(getattr(MessageRecord, c.attr).fget)["return"]
        else:
            hint = hints[c.attr]
        out.append(_column(c.sql, hint, c.kind, defaults.get(c.attr)))
    return out


_FIELD_OF = {"configured_usd": "configured"}
"""Columns named other than their record's field."""
TABLES: dict[str, list[_Col]] = {
    "message": _message_columns(),
    "session": _record_columns(SessionRecord, OP_COLUMNS["session"], _FIELD_OF),
    "agent": _record_columns(AgentBudgetRecord, OP_COLUMNS["agent"], _FIELD_OF),
    "global": _record_columns(GlobalBudgetRecord, OP_COLUMNS["global"], _FIELD_OF),
}
"""Each queued operation's columns, in ``OP_COLUMNS`` order, typed from its record."""
_TABLE = {
    "message": "token_usage",
    "session": "sessions",
    "agent": "agent_budgets",
    "global": "global_budget",
}
_KEYS = {"message": ("id",), "session": ("id",), "agent": ("session_id", "agent_id")}
_KEEP = {"session": {"id", "created_at"}, "agent": {"session_id", "agent_id"}, "global": set()}
"""Columns an upsert leaves as they are."""

_COUNTED = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
            "reasoning_tokens")  # fmt: skip
_SUMMED = (*_COUNTED, "unpriced_message_count")


def _create_table(op: str, extra: str = "", tail: str = "") -> str:
    cols = ", ".join(c.ddl() for c in TABLES[op])
    return f"CREATE TABLE {_TABLE[op]} ({extra}{cols}{tail})"


_SANE = (
    ", "
    + ", ".join(f"CHECK ({c} BETWEEN 0 AND {TOKEN_LIMIT})" for c in _COUNTED)
    + f", CHECK (cost_usd IS NULL OR cost_usd BETWEEN 0 AND {COST_LIMIT:.0f})"
)
"""What the SQLite store's trigger refuses: counts and costs that cannot be right."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        _create_table("session", tail=", PRIMARY KEY (id)"),
        _create_table(
            "message",
            "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ",
            ", UNIQUE (id)" + _SANE,
        ),
        "CREATE INDEX token_usage_session ON token_usage (session_id, seq)",
        "CREATE INDEX token_usage_started ON token_usage (started_at)",
        _create_table("agent", tail=", PRIMARY KEY (session_id, agent_id)"),
        _create_table("global", "id INTEGER PRIMARY KEY CHECK (id = 1), "),
        "CREATE TABLE rejected_rows (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, "
        "data TEXT NOT NULL)",
        "CREATE TABLE session_totals (session_id TEXT PRIMARY KEY, "
        + ", ".join(f"{c} BIGINT NOT NULL" for c in ("message_count", *_SUMMED))
        + ", cost_usd NUMERIC, last_at DOUBLE PRECISION)",
    ),
)
"""The numbered schema versions (``spendgate_schema``). Version 1 is created from the
records as they are; a column added later is added at start-up (:meth:`_add_columns`)."""


# -- parameters: queued as JSON-friendly values (the journal), typed at write time ------

_message_params = message_encoder(str)
"""A row as queued: money as its exact decimal string (the journal is JSON)."""


def _record_params(op: str, record: Any) -> list[Any]:
    out: list[Any] = []
    for c in TABLES[op]:
        if c.name == "updated_at":
            out.append(time.time())
            continue
        value = getattr(record, _FIELD_OF.get(c.name, c.name))
        out.append(str(value) if isinstance(value, Decimal) else value)
    return out


class _BadValue(ValueError):
    pass


def _to_numeric(v: Any) -> Decimal | None:
    if v is None or isinstance(v, Decimal):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _BadValue(f"not a number: {v!r}")
    try:
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    except InvalidOperation:
        raise _BadValue(f"not a number: {v!r}") from None
    if not d.is_finite():
        raise _BadValue(f"not a finite number: {v!r}")
    return d


def _to_bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _BadValue(f"not a flag: {v!r}")


def _to_int(v: Any) -> int | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise _BadValue(f"not a whole number: {v!r}")


def _to_float(v: Any) -> float | None:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    raise _BadValue(f"not a number: {v!r}")


def _to_text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise _BadValue(f"not text: {v!r}")


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "NUMERIC": _to_numeric,
    "BOOLEAN": _to_bool,
    "BIGINT": _to_int,
    "DOUBLE PRECISION": _to_float,
    "TEXT": _to_text,
}
_CONVERTERS = {op: tuple(_CONVERT[c.type] for c in cols) for op, cols in TABLES.items()}


def _check_width(width: int, params: Sequence[Any]) -> None:
    if len(params) != width:
        raise _BadValue(f"{len(params)} values for {width} columns")


def _typed(op: str, params: Sequence[Any]) -> list[Any]:
    """A queued write's values as the columns' types (_BadValue: a value that cannot be)."""
    conv = _CONVERTERS[op]
    _check_width(len(conv), params)
    return [f(v) for f, v in zip(conv, params, strict=True)]


def _from_json(i: int, c: _Col) -> str:
    """Element ``i`` of the row ``e`` (a JSON array) as column ``c``'s type. Each form
    refuses, with an error of SQLSTATE class 22 (so the batch is retried row by row,
    where :func:`_typed` names the reason), every JSON value :func:`_typed` would refuse;
    it may refuse more (a flag given as 0 or 1), which the retry writes as typed."""
    v = f"NULLIF(e->{i}, 'null')"  # JSON null: SQL NULL (a jsonb null casts to nothing)
    if c.type == "TEXT":  # ->> would turn any scalar into text: only strings are text
        return (
            f"CASE jsonb_typeof(e->{i}) WHEN 'string' THEN e->>{i} WHEN 'null' THEN NULL "
            f"ELSE ('not text: ' || (e->{i})::text)::bigint::text END"
        )
    if c.type == "BIGINT":  # a number's own digits, so 1.5 is refused rather than rounded
        return f"{v}::numeric::text::bigint"
    if c.type == "NUMERIC":  # money is queued as its decimal string: read as a JSON number
        return f"(e->>{i})::jsonb::numeric"
    return f"{v}::{'float8' if c.type == 'DOUBLE PRECISION' else c.type.lower()}"


def _rows_from_json(op: str) -> str:
    """``SELECT`` of the rows passed as one parameter, a JSON array of rows (each the
    array of its values in ``TABLES[op]`` order), decoded and typed by the server: one
    value to encode per batch, where one array per column cost asyncpg a type check and
    an encoding per value (bench/results.md, "The PostgreSQL store's write path")."""
    cols = TABLES[op]
    values = ", ".join(f"{_from_json(i, c)} AS {c.name}" for i, c in enumerate(cols))
    return (
        f"SELECT {values} FROM jsonb_array_elements(convert_from($1::bytea, 'UTF8')::jsonb) AS r(e)"
    )


def _insert_messages() -> str:
    names = ", ".join(c.name for c in TABLES["message"])
    sums = ", ".join(f"SUM({c})" for c in _COUNTED)
    totals = ("message_count", *_COUNTED, "unpriced_message_count", "cost_usd", "last_at")
    added = ", ".join(
        f"{c} = session_totals.{c} + excluded.{c}" for c in ("message_count", *_SUMMED)
    )
    return (
        f"WITH ins AS (INSERT INTO token_usage ({names}) {_rows_from_json('message')} "
        "ON CONFLICT (id) DO NOTHING "
        f"RETURNING session_id, {', '.join(_COUNTED)}, cost_usd, total_tokens, started_at), "
        f"tot AS (INSERT INTO session_totals (session_id, {', '.join(totals)}) "
        f"SELECT session_id, COUNT(*), {sums}, "
        "COUNT(*) FILTER (WHERE cost_usd IS NULL AND total_tokens > 0), SUM(cost_usd), "
        "MAX(started_at) FROM ins GROUP BY session_id ORDER BY session_id "
        f"ON CONFLICT (session_id) DO UPDATE SET {added}, "
        "cost_usd = CASE WHEN excluded.cost_usd IS NULL THEN session_totals.cost_usd "
        "ELSE COALESCE(session_totals.cost_usd, 0) + excluded.cost_usd END, "
        "last_at = GREATEST(session_totals.last_at, excluded.last_at)) "
        "SELECT COUNT(*) FROM ins"
    )


def _upsert(op: str) -> str:
    cols = TABLES[op]
    names = ", ".join(c.name for c in cols)
    sets = ", ".join(f"{c.name} = excluded.{c.name}" for c in cols if c.name not in _KEEP[op])
    if op == "global":
        return (
            f"INSERT INTO global_budget (id, {names}) SELECT 1, * FROM ({_rows_from_json(op)}) g "
            f"ON CONFLICT (id) DO UPDATE SET {sets}"
        )
    table = _TABLE[op]
    newer = f"{table}.updated_at IS NULL OR excluded.updated_at >= {table}.updated_at"
    return (
        f"INSERT INTO {table} ({names}) {_rows_from_json(op)} "
        f"ON CONFLICT ({', '.join(_KEYS[op])}) DO UPDATE SET {sets} WHERE {newer}"
    )


_WRITES = {op: _upsert(op) for op in ("session", "agent", "global")}
_WRITES["message"] = _insert_messages()
_WRITE_ORDER = ("session", "agent", "global", "message")
"""The batch's statements: budgets first (as SQLite), then the rows."""


def _key_of(op: str, params: Sequence[Any]) -> Any:
    if op == "global":
        return 1
    if op == "agent":
        return (params[0], params[1])
    return params[0]


def _latest(op: str, rows: list[Sequence[Any]]) -> list[Sequence[Any]]:
    """One row per key, the last queued (an upsert may touch a row once per statement)."""
    if op == "message":
        return rows
    last = {_key_of(op, r): i for i, r in enumerate(rows)}
    return [rows[i] for i in sorted(last.values())]


def _money_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


def _json_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    """The rows as the statement's one parameter (:func:`_rows_from_json`): orjson
    refuses an integer past 64 bits and a lone surrogate (a row error, then)."""
    return orjson.dumps(rows, default=_money_text)


def _batch_rows(
    batch: Iterable[tuple[str, Sequence[Any], bool]], rejected: list[tuple[str, str, Sequence[Any]]]
) -> list[tuple[str, list[Sequence[Any]]]]:
    """A batch's writes by operation, in ``_WRITE_ORDER``, as queued (what rejected_rows
    keeps); a write of the wrong width goes to ``rejected``, the one check made here
    (the server types the values)."""
    by_op: dict[str, list[Sequence[Any]]] = {op: [] for op in _WRITE_ORDER}
    for op, params, _ in batch:
        try:
            if op not in by_op:
                raise _BadValue(f"unknown operation {op!r}")
            _check_width(len(_CONVERTERS[op]), params)
        except _BadValue as exc:
            rejected.append((op, _reason(exc), params))
            continue
        by_op[op].append(params)
    return [(op, _latest(op, rows)) for op, rows in by_op.items() if rows]


_BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
"""A batch's transaction and the writers' lock in one round trip (a query without
parameters may hold two statements)."""


@contextlib.asynccontextmanager
async def _savepoint(conn: Any) -> AsyncIterator[None]:
    """A statement that may be refused, undone alone (the batch's transaction is kept)."""
    await conn.execute("SAVEPOINT spendgate_row")
    try:
        yield
    except BaseException:
        await conn.execute("ROLLBACK TO SAVEPOINT spendgate_row")
        raise
    await conn.execute("RELEASE SAVEPOINT spendgate_row")


async def _rollback(conn: Any) -> None:
    """End a failed batch's transaction; a connection that cannot is closed (the pool
    opens another), so no transaction is left open on a pooled connection."""
    if conn.is_closed():
        return
    try:
        await conn.execute("ROLLBACK")
    except Exception:
        conn.terminate()


def _reason(exc: BaseException) -> str:
    """Why a row was refused, on one line (PostgreSQL's DETAIL repeats the row)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def is_row_error(exc: BaseException) -> bool:
    """Did the database refuse this row (its values), rather than fail as a whole? A
    value that is not the column's type (ours, or one JSON cannot carry), a data
    exception (SQLSTATE class 22: out of range, bad text), a constraint (class 23) or a
    limit (class 54: a batch's JSON past jsonb's 256 MB, written again row by row).
    Everything else (connection refused or lost, shutdown, timeout) keeps the rows."""
    if isinstance(exc, (_BadValue, orjson.JSONEncodeError)):
        return True  # a value of the wrong type, or one JSON cannot carry
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return True  # asyncpg could not encode a parameter
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in ("22", "23", "54")


def _problem(exc: BaseException) -> str:
    if isinstance(exc, (ConnectionRefusedError, OSError)) and not isinstance(
        exc, asyncpg.PostgresError
    ):
        return f"cannot connect ({exc})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}"


def _round(value: Decimal | None) -> Decimal | None:
    """A sum as the API shows it: at most COST_DIGITS decimals (as the SQLite store)."""
    if value is None:
        return None
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -COST_DIGITS:
        value = round(value, COST_DIGITS)
    return value.normalize() if value else Decimal(0)


_SELECT_COLUMNS = ", ".join(c.sql for c in STORED_FIELDS)
_TOTALS = (
    "COUNT(*) AS message_count, "
    + ", ".join(f"COALESCE(SUM({c}), 0)::BIGINT AS {c}" for c in _COUNTED)
    + ", SUM(cost_usd) AS cost_usd, "
    "COUNT(*) FILTER (WHERE cost_usd IS NULL AND total_tokens > 0) AS unpriced_message_count, "
    "MAX(started_at) AS last_at"
)
"""The SQLite store's ``_TOTALS``, in PostgreSQL."""


_UTC = "to_timestamp(started_at) AT TIME ZONE 'UTC'"
_REPORT_KEY = {
    "hour": f"""to_char({_UTC}, 'YYYY-MM-DD"T"HH24:00"Z"')""",
    "day": f"to_char({_UTC}, 'YYYY-MM-DD')",
    "week": f"""to_char({_UTC}, 'IYYY-"W"IW')""",  # ISO 8601 week
    "month": f"to_char({_UTC}, 'YYYY-MM')",
    "model": "model",
    "agent": "agent_id",
    "session": "session_id",
}
"""Each grouping of a report (``store.REPORT_BY``), in the SQLite store's key forms."""
_REPORT_SUMS = (
    "COUNT(*) AS message_count, "
    + ", ".join(f"COALESCE(SUM({c}), 0)::BIGINT AS {c}" for c in _COUNTED[:3])
    + ", SUM(cost_usd) AS cost_usd, "
    "COUNT(*) FILTER (WHERE cost_usd IS NULL AND total_tokens > 0) AS unpriced_message_count"
)


def _report_sql(
    by: str, since: float | None, until: float | None, session: str | None
) -> tuple[str, list[Any]]:
    """The SQLite store's report query, in PostgreSQL: one GROUP BY over the rows in
    the bounds, keys in byte order (``COLLATE "C"``, as SQLite), null last."""
    key = _REPORT_KEY.get(by)
    if key is None:
        raise ValueError(f"unknown report grouping {by!r}")
    where: list[str] = []
    params: list[Any] = []
    for cond, value in (("started_at >= ", since), ("started_at < ", until),
                        ("session_id = ", session)):  # fmt: skip
        if value is not None:
            params.append(value)
            where.append(f"{cond}${len(params)}")
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT {key} AS key, {_REPORT_SUMS} FROM token_usage{cond} GROUP BY 1"
    if by == "session":
        sql = f"SELECT g.*, s.label AS label FROM ({sql}) g LEFT JOIN sessions s ON s.id = g.key"
    return f'SELECT * FROM ({sql}) r ORDER BY key COLLATE "C" NULLS LAST', params


FLUSH_CHANNEL = "spendgate_flush"
"""NOTIFY channel of read barriers: a replica about to read asks every writer to commit."""
FLUSHED_CHANNEL = "spendgate_flushed"
"""NOTIFY channel of the answers: ``TOKEN REPLICA`` once that replica has committed."""
BARRIER_S = 1.0
"""The longest a read waits for the other replicas' answers (then it reads anyway)."""
WRITER_NAME = "spendgate-writer "
"""``application_name`` prefix of a writing replica's listening connection: the
replicas a barrier waits for are the connections of that name (a dead replica's
connection is gone, so nobody waits for it)."""
_REPEAT_LOG_S = 30.0


class _ReadBarrier:
    """Read-your-writes across replicas (docs/reference.md §5 "PostgreSQL"): before a
    read, every other live writer commits what it has queued. One listening connection
    per store: a writer answers requests on FLUSH_CHANNEL after its own flush; a reader
    counts the writers (``pg_stat_activity``), asks, and waits for that many answers,
    BARRIER_S at most."""

    def __init__(self, store: PostgresStore, answers: bool) -> None:
        self.store = store
        self.answers = answers
        replica = store.replica or f"{socket.gethostname()[:24]}-{os.getpid()}"
        self.id = f"{replica[:36]}-{os.urandom(3).hex()}"  # one per store, within 63 bytes
        self.name = (WRITER_NAME if answers else "spendgate-reader ") + self.id
        self._conn: Any = None
        self._tokens = itertools.count(1)
        self._waiting: dict[str, tuple[set[str], int, asyncio.Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._current: asyncio.Future[None] | None = None
        """The round under way."""
        self._next: asyncio.Future[None] | None = None
        """The round that starts when it ends, shared by the reads that came meanwhile."""
        self._next_connect = 0.0
        self._next_log = 0.0

    async def connect(self) -> None:
        """(Re)open the listening connection; it does not survive a server restart."""
        self._next_connect = time.monotonic() + 1.0
        conn = await asyncpg.connect(
            self.store.url, timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": self.name},
        )  # fmt: skip
        await conn.add_listener(FLUSHED_CHANNEL, self._answered)
        if self.answers:
            await conn.add_listener(FLUSH_CHANNEL, self._asked)
        self._conn = conn

    async def ensure(self) -> bool:
        """Is the listening connection up (reconnected at most once a second)?"""
        if self._conn is not None and not self._conn.is_closed():
            return True
        if time.monotonic() < self._next_connect:
            return False
        try:
            await self.connect()
        except Exception:
            return False
        return True

    async def close(self) -> None:
        for task in [*self._tasks, self._current, self._next]:
            if task is not None:
                task.cancel()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 5)
            self._conn = None

    def _asked(self, conn: Any, pid: int, channel: str, token: str) -> None:
        if token.startswith(self.id + ":"):
            return
        task = asyncio.create_task(self._answer(token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, token: str) -> None:
        await QueuedStore.flush(self.store)  # this replica's own queue, committed
        with contextlib.suppress(Exception):
            await self.store.pool.execute(
                "SELECT pg_notify($1, $2)", FLUSHED_CHANNEL, f"{token} {self.id}"
            )

    def _answered(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        token, _, replica = payload.partition(" ")
        found = self._waiting.get(token)
        if found is None:
            return
        seen, expected, done = found
        seen.add(replica)
        if len(seen) >= expected:
            done.set()

    async def wait(self) -> None:
        """Every other writer has committed what it queued before this call (or
        BARRIER_S passed: a WARNING says how many did not answer). Reads that come
        while a round is under way share the next one (it starts after all of them)."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._after(self._current))
        await asyncio.shield(self._next)

    async def _after(self, running: asyncio.Future[None] | None) -> None:
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        self._current, self._next = self._next, None
        try:
            await self._round()
        finally:
            self._current = None

    async def _round(self) -> None:
        if not await self.ensure():
            return
        pool = self.store.pool
        token = f"{self.id}:{next(self._tokens)}"
        try:
            count = (
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND starts_with(application_name, $1) AND application_name <> $2"
            )
            expected = int(await pool.fetchval(count, WRITER_NAME, self.name))
            if not expected:
                return
            seen: set[str] = set()
            done = asyncio.Event()
            self._waiting[token] = (seen, expected, done)
            await pool.execute("SELECT pg_notify($1, $2)", FLUSH_CHANNEL, token)
            await asyncio.wait_for(done.wait(), BARRIER_S)
        except TimeoutError:
            now = time.monotonic()
            if now >= self._next_log:
                self._next_log = now + _REPEAT_LOG_S
                log.warning(
                    "database %s: %d of %d other replicas did not confirm their writes "
                    "within %g s; this read may miss their latest rows",
                    self.store.where, expected - len(seen), expected, BARRIER_S,
                )  # fmt: skip
        except Exception:
            return  # the database is failing: the read says so itself
        finally:
            self._waiting.pop(token, None)


async def _keep_session(conn: Any) -> None:
    """The pool's reset after the rollback asyncpg always does: nothing more, as this
    module leaves no session state on a pooled connection (its advisory locks are
    transaction-scoped, it listens, sets and opens cursors on none), so a release costs
    no ``RESET ALL`` round trip (one per batch)."""


class PostgresStore(QueuedStore):
    def __init__(
        self,
        url: str,
        journal_at: Path,
        flush_interval: float = 0.2,
        max_queue: int = 200_000,
        on_drop: Callable[[int], None] | None = None,
        on_reject: Callable[[int], None] | None = None,
        on_error: Callable[[int], None] | None = None,
        replica: str | None = None,
    ) -> None:
        """``url``: ``postgresql://user:password@host:port/database``; ``journal_at``:
        the local name the journal and recovery files take (:func:`journal_path`);
        ``replica``: ``SPENDGATE_REPLICA_ID``, in the name of the listening connection
        (default: host and pid). See :class:`QueuedStore` for the rest."""
        super().__init__(
            journal_at, safe_url(url), flush_interval, max_queue, on_drop, on_reject, on_error
        )
        self.url = url
        self.replica = replica
        self._pool: Any = None
        self._inserted = 0
        """Message rows this process inserted (duplicates not counted)."""
        self._barrier: _ReadBarrier | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, start_writer: bool = True) -> None:
        """Connect, create or migrate the schema, and (``start_writer``: the proxy) start
        the journal and the writer. :class:`StoreOpenError` if the database cannot be
        used, saying why in one line."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings={"application_name": "spendgate"},
                reset=_keep_session,
            )
        except Exception as exc:
            raise StoreOpenError(self.where, _problem(exc)) from None
        try:
            await self._migrate()
        except BaseException as exc:
            await self._close_pool()
            if isinstance(exc, StoreOpenError):
                raise
            if isinstance(exc, Exception):
                raise StoreOpenError(self.where, _problem(exc)) from None
            raise
        self._barrier = _ReadBarrier(self, answers=start_writer)
        try:
            await self._barrier.connect()
            if start_writer:
                await self._start_writer()
        except BaseException as exc:
            await self._barrier.close()
            await self._close_pool()
            if isinstance(exc, (StoreOpenError, asyncio.CancelledError)) or not isinstance(
                exc, Exception
            ):
                raise
            raise StoreOpenError(self.where, _problem(exc)) from None

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS spendgate_schema (version INTEGER NOT NULL)"
            )
            version = int(await conn.fetchval("SELECT MAX(version) FROM spendgate_schema") or 0)
            if version > len(MIGRATIONS):
                raise StoreOpenError(
                    self.where,
                    f"its schema version {version} is newer than this spendgate knows "
                    f"({len(MIGRATIONS)}): upgrade spendgate",
                )
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for sql in statements:
                    await conn.execute(sql)
                await conn.execute("INSERT INTO spendgate_schema (version) VALUES ($1)", number)
                log.info("database %s migrated to schema version %d", self.where, number)
            await self._add_columns(conn)

    async def _add_columns(self, conn: Any) -> None:
        """Columns a newer spendgate added to the records (another engineer's, a later
        version's): added to the existing tables, so the writes that carry them work."""
        for op, cols in TABLES.items():
            table = _TABLE[op]
            have = {
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = $1",
                    table,
                )
            }
            for c in cols:
                if c.name not in have:
                    await conn.execute(f"ALTER TABLE {table} ADD COLUMN {c.ddl(adding=True)}")
                    log.info("database %s: column %s.%s added", self.where, table, c.name)

    async def close(self) -> None:
        """Write everything queued, then close (the rest: the recovery file)."""
        await self._stop_writer()
        if self._barrier is not None:
            await self._barrier.close()
        await self._close_pool()

    async def flush(self, timeout: float = 10.0) -> None:
        """Read-your-writes across replicas: this process's queue is committed (as
        SQLite's), then every other live replica's (:class:`_ReadBarrier`)."""
        await super().flush(timeout)
        if self._barrier is not None and self._failing is None:
            await self._barrier.wait()

    async def _watch(self) -> None:
        """Before each write: the barrier's connection, back after a server restart."""
        if self._barrier is not None:
            await self._barrier.ensure()

    async def _close_pool(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), 5)
        except Exception:
            pool.terminate()

    async def _abandon(self) -> None:
        await super()._abandon()
        await self._close_pool()

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    # -- writes --------------------------------------------------------------------------

    def add_message(self, message: MessageRecord) -> None:
        self._enqueue("message", _message_params(message))

    def save_session(self, session: SessionRecord) -> None:
        self._enqueue("session", _record_params("session", session))

    def save_agent_budget(self, agent: AgentBudgetRecord) -> None:
        self._enqueue("agent", _record_params("agent", agent))

    def save_global_budget(self, budget: GlobalBudgetRecord) -> None:
        self._enqueue("global", _record_params("global", budget))

    async def _write_batch(self) -> None:
        """One transaction under the writers' lock: each operation's rows in one
        statement. A row the database refuses aborts it; it is then done again
        ``careful``ly (:meth:`_transaction`), so a good batch pays no savepoints."""
        if not self._pending:
            return
        n = min(len(self._pending), BATCH_MAX)
        batch = list(itertools.islice(self._pending, n))
        rejected: list[tuple[str, str, Sequence[Any]]] = []
        ops = _batch_rows(batch, rejected)
        async with self.pool.acquire() as conn:
            try:
                inserted = await self._transaction(conn, ops, rejected, careful=False)
            except Exception as exc:
                if not is_row_error(exc):
                    raise
                inserted = await self._transaction(conn, ops, rejected, careful=True)
        self._inserted += inserted
        await self._committed(n, rejected)

    async def _transaction(
        self,
        conn: Any,
        ops: list[tuple[str, list[Sequence[Any]]]],
        rejected: list[tuple[str, str, Sequence[Any]]],
        careful: bool,
    ) -> int:
        """Write ``ops`` and ``rejected`` in one transaction; the message rows inserted.
        ``careful``: each statement in a savepoint, and an operation the database
        refuses is written row by row, each row checked and typed here first
        (:func:`_typed`: its reason), the rows refused added to ``rejected``."""
        inserted = 0
        try:
            await conn.execute(_BEGIN)  # in the try: a BEGIN cut short is rolled back too
            for op, rows in ops:
                if not careful:
                    inserted += await self._write(conn, op, _json_rows(rows))
                    continue
                try:
                    payload = _json_rows(rows)
                    async with _savepoint(conn):
                        inserted += await self._write(conn, op, payload)
                except Exception as exc:
                    if not is_row_error(exc):
                        raise
                    for params in rows:
                        try:
                            payload = _json_rows([_typed(op, params)])
                            async with _savepoint(conn):
                                inserted += await self._write(conn, op, payload)
                        except Exception as exc1:
                            if not is_row_error(exc1):
                                raise
                            rejected.append((op, _reason(exc1), params))
            if rejected:
                now = time.time()
                await conn.executemany(
                    "INSERT INTO rejected_rows (at, kind, reason, data) VALUES ($1, $2, $3, $4)",
                    [(now, op, why, _rejected_data(op, p)) for op, why, p in rejected],
                )
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        return inserted

    @staticmethod
    async def _write(conn: Any, op: str, payload: bytes) -> int:
        if op == "message":
            return int(await conn.fetchval(_WRITES[op], payload))
        await conn.execute(_WRITES[op], payload)
        return 0

    async def _defaults(self) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {}
        for op, cols in TABLES.items():
            for c in cols:
                if c.default is not None:
                    out[op, c.name] = c.default
        return out

    async def _max_seq(self) -> int:
        return self._inserted

    # -- reads ---------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.pool.fetch(sql, *args))

    async def load_sessions(self) -> list[SessionRecord]:
        rows = await self._fetch("SELECT * FROM sessions")
        return [_record(SessionRecord, "session", r) for r in rows]

    async def load_agent_budgets(self) -> list[AgentBudgetRecord]:
        rows = await self._fetch("SELECT * FROM agent_budgets")
        return [_record(AgentBudgetRecord, "agent", r) for r in rows]

    async def load_global_budget(self) -> GlobalBudgetRecord | None:
        rows = await self._fetch("SELECT * FROM global_budget")
        return _record(GlobalBudgetRecord, "global", rows[0]) if rows else None

    async def agent_spend(
        self, agents: Iterable[tuple[str, str]], before: float | None = None
    ) -> dict[tuple[str, str], Decimal]:
        await self.flush()
        out: dict[tuple[str, str], Decimal] = {}
        for sid, agent in agents:
            value = await self.pool.fetchval(
                "SELECT SUM(cost_usd) FROM token_usage WHERE session_id = $1 AND agent_id = $2 "
                "AND ($3::float8 IS NULL OR started_at < $3)",
                sid, agent, before,
            )  # fmt: skip
            out[(sid, agent)] = _round(value) or Decimal(0)
        return out

    async def spend_since(self, since: float | None) -> Decimal:
        await self.flush()
        value = await self.pool.fetchval(
            "SELECT SUM(cost_usd) FROM token_usage WHERE $1::float8 IS NULL OR started_at >= $1",
            since,
        )
        return _round(value) or Decimal(0)

    async def spend_by_session(self) -> dict[str, Decimal]:
        await self.flush()
        rows = await self._fetch("SELECT session_id, cost_usd FROM session_totals")
        return {r["session_id"]: _round(r["cost_usd"]) or Decimal(0) for r in rows}

    async def session_totals(self) -> list[dict[str, Any]]:
        """Every session row with its totals (kept by the writes: one read of two
        tables, whatever the number of rows), newest activity first. ``cost_usd`` is a
        ``Decimal`` (None: no priced row)."""
        await self.flush()
        counts = ", ".join(f"COALESCE(t.{c}, 0) AS {c}" for c in ("message_count", *_SUMMED))
        rows = await self._fetch(
            f"SELECT s.*, {counts}, t.cost_usd AS cost_usd, t.last_at AS last_at "
            "FROM sessions s LEFT JOIN session_totals t ON t.session_id = s.id"
        )
        out = []
        for r in rows:
            row = dict(r)
            row["cost_usd"] = _round(row["cost_usd"])
            out.append(row)
        out.sort(key=lambda r: r["last_at"] or r["created_at"], reverse=True)
        return out

    async def totals(self, session_id: str, group_by: str | None = None) -> list[dict[str, Any]]:
        await self.flush()
        if group_by not in (None, "model", "agent_id"):
            raise ValueError(group_by)
        key = f"{group_by} AS key, " if group_by else ""
        tail = f" GROUP BY {group_by} ORDER BY {group_by}" if group_by else ""
        rows = await self._fetch(
            f"SELECT {key}{_TOTALS} FROM token_usage WHERE session_id = $1{tail}", session_id
        )
        out = []
        for r in rows:
            row = dict(r)
            row["cost_usd"] = _round(row["cost_usd"])
            out.append(row)
        return out

    async def messages(
        self, session_id: str, after: int, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        """A page of a session's rows after the cursor ``after`` (a ``seq``). Sound
        with several writers: seq grows in commit order (the module's docstring)."""
        await self.flush()
        rows = await self._fetch(
            f"SELECT {_SELECT_COLUMNS}, seq FROM token_usage WHERE session_id = $1 AND seq > $2 "
            "ORDER BY seq LIMIT $3",
            session_id, after, limit + 1,
        )  # fmt: skip
        more = len(rows) > limit
        rows = rows[:limit]
        return [_message(r) for r in rows], (rows[-1]["seq"] if more else None)

    async def report(
        self,
        by: str,
        since: float | None = None,
        until: float | None = None,
        session: str | None = None,
    ) -> list[dict[str, Any]]:
        """As :meth:`spendgate.store.SQLiteStore.report` (the same keys and rows)."""
        sql, params = _report_sql(by, since, until, session)
        await self.flush()
        out = []
        for r in await self._fetch(sql, *params):
            row = dict(r)
            row["cost_usd"] = _round(row["cost_usd"])
            out.append(row)
        return out

    async def prune(
        self,
        before: float,
        keep: Collection[str] = (),
        period_start: float | None = None,
        dry_run: bool = False,
    ) -> Pruned:
        """As :meth:`spendgate.store.SQLiteStore.prune`: the sessions chosen from
        ``session_totals`` (kept by the writes), removed in one transaction holding the
        writers' lock, so no batch lands half way through."""
        await self.flush()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            rows = await conn.fetch(
                "SELECT COALESCE(s.id, t.session_id) AS id, "
                "COALESCE(t.message_count, 0) AS n FROM sessions s "
                "FULL JOIN session_totals t ON t.session_id = s.id "
                "WHERE COALESCE(t.last_at, s.created_at) < $1",
                before,
            )
            chosen = sorted(r["id"] for r in rows if r["id"] not in keep)
            kept = sorted(r["id"] for r in rows if r["id"] in keep)
            messages = sum(int(r["n"]) for r in rows if r["id"] not in keep)
            spend = await conn.fetchval(
                "SELECT SUM(cost_usd) FROM token_usage "
                "WHERE session_id = ANY($1::text[]) AND started_at >= $2",
                chosen,
                float("-inf") if period_start is None else period_start,
            )
            if not dry_run and chosen:
                for table, column in _PRUNED:
                    await conn.execute(
                        f"DELETE FROM {table} WHERE {column} = ANY($1::text[])", chosen
                    )
        if not dry_run and chosen:
            log.warning(
                "database %s: removed %d sessions (%d message rows) last active before %s",
                safe_url(self.url), len(chosen), messages, iso_bound(before),
            )  # fmt: skip
        return Pruned(chosen, messages, _round(spend) or Decimal(0), kept)

    async def latest_message(self, session_id: str) -> MessageRecord | None:
        await self.flush()
        rows = await self._fetch(
            f"SELECT {_SELECT_COLUMNS} FROM token_usage WHERE session_id = $1 "
            "ORDER BY seq DESC LIMIT 1",
            session_id,
        )
        return _message(rows[0]) if rows else None


_N_STORED = len(STORED_FIELDS)


def _message(r: Any) -> MessageRecord:
    return MessageRecord(*tuple(r)[:_N_STORED])


def _record(cls: Any, op: str, r: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {_FIELD_OF.get(c.name, c.name): r[c.name] for c in TABLES[op]}
    return cls(**{k: v for k, v in values.items() if k in names})
