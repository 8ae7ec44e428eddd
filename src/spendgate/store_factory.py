"""Which store the settings name, opened one way for ``serve`` and the CLI
(docs/reference.md §5 "Choosing the store", §10 ``SPENDGATE_STORE_URL``).

``SPENDGATE_STORE_URL`` is ``sqlite:///PATH`` (``sqlite:////abs/path`` for an absolute
path, as SQLAlchemy spells it) or ``postgresql://user:password@host:port/database``;
unset, the SQLite file at ``SPENDGATE_DB_PATH``. PostgreSQL needs the ``shared`` extra
(asyncpg): without it the store cannot open, and start-up says so in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from spendgate.settings import Settings
from spendgate.store import SQLiteStore, StoreOpenError

if TYPE_CHECKING:
    from spendgate.store import Store

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
MISSING_EXTRA = "needs the asyncpg package: pip install 'spendgate[shared]'"


def is_postgres(url: str | None) -> bool:
    return url is not None and url.startswith(POSTGRES_PREFIXES)


def sqlite_path(settings: Settings) -> Path:
    """The SQLite file in use (the URL's, else ``db_path``)."""
    url = settings.store_url
    if url is not None and url.startswith(SQLITE_PREFIX):
        return Path(url[len(SQLITE_PREFIX) :]).expanduser()
    return settings.db_path


def describe(settings: Settings) -> str:
    """The database as start-up lines and reports name it (no password)."""
    url = settings.store_url
    if is_postgres(url):
        assert url is not None
        return safe_url(url)
    return str(sqlite_path(settings))


def safe_url(url: str) -> str:
    """The URL as log lines and errors show it: no password (and no parsing that could
    fail on a malformed URL, which is what an error line is about)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def journal_path(url: str, beside: Path) -> Path:
    """Where this process's journal for the database at ``url`` lives: a local file
    named after the server and database (not the password), in ``beside``."""
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2] or "local"
    name = f"{hostport}{parts.path or '/'}"
    digest = hashlib.sha256(safe_url(url).encode()).hexdigest()[:10]
    clean = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name)
    return beside / f"postgres-{clean}-{digest}"


def make_store(
    settings: Settings,
    on_drop: Callable[[int], None] | None = None,
    on_reject: Callable[[int], None] | None = None,
    on_error: Callable[[int], None] | None = None,
) -> Store:
    """The store the settings name, not yet open. :class:`StoreOpenError` (one line)
    when it is PostgreSQL and asyncpg is not installed."""
    interval = settings.flush_interval_ms / 1000
    url = settings.store_url
    if not is_postgres(url):
        return SQLiteStore(
            sqlite_path(settings), flush_interval=interval, on_drop=on_drop,
            on_reject=on_reject, on_error=on_error,
        )  # fmt: skip
    assert url is not None
    try:
        from spendgate.store_postgres import PostgresStore
    except ImportError as exc:
        if exc.name != "asyncpg":
            raise
        raise StoreOpenError(safe_url(url), MISSING_EXTRA) from None
    return PostgresStore(
        url, journal_path(url, settings.db_path.parent), flush_interval=interval,
        on_drop=on_drop, on_reject=on_reject, on_error=on_error, replica=settings.replica_id,
    )  # fmt: skip
