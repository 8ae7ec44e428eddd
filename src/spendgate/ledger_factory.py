"""Which budget ledger and event bus the settings name (docs/reference.md §6 "Several
replicas", §10 ``SPENDGATE_REDIS_URL``): this process's memory, or one Redis that
several replicas share.

Redis needs the ``shared`` extra (redis-py) and a shared store: rows kept in each
replica's own SQLite file would never add up to the shared spend, so that combination
is refused at start-up in one line (:class:`SharedSetupError`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from spendgate.budgets import BudgetLedger, MemoryLedger
from spendgate.bus import EventBus, MemoryBus
from spendgate.settings import Settings
from spendgate.store_factory import is_postgres, safe_url

if TYPE_CHECKING:
    from spendgate.store import Store

MISSING_EXTRA = (
    "SPENDGATE_REDIS_URL needs the redis and hiredis packages: pip install 'spendgate[shared]'"
)
NEEDS_SHARED_STORE = (
    "SPENDGATE_REDIS_URL shares budgets between replicas, but each would keep its own "
    "SQLite rows: set SPENDGATE_STORE_URL=postgresql://... as well"
)


REDIS_CONNECTIONS = 64
"""Connections to Redis per replica at most; more concurrent calls wait for one."""


class SharedSetupError(Exception):
    """Settings that cannot run as a shared deployment, said in one line."""


def _usd(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def check(settings: Settings) -> None:
    """Refuse, in one line, what cannot work: Redis without its client or with SQLite."""
    if settings.redis_url is None:
        return
    try:
        import hiredis  # noqa: F401
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise SharedSetupError(MISSING_EXTRA) from None
    if not is_postgres(settings.store_url):
        raise SharedSetupError(NEEDS_SHARED_STORE)


class Backends:
    """The ledger and the bus, started together and closed together (with their Redis
    connection pool when shared)."""

    def __init__(self, ledger: BudgetLedger, bus: EventBus, client: Any = None) -> None:
        self.ledger = ledger
        self.bus = bus
        self._client = client

    async def close(self) -> None:
        await self.ledger.close()
        if self._client is not None:
            await self._client.aclose()


def redis_client(url: str) -> Any:
    """A Redis client for the ledger and the bus of one replica.

    A pooled connection to a Redis that restarted fails once: it is tried again on a
    fresh one (every script is idempotent by its ids, so a retried call counts once).
    The pool is bounded and makes a burst wait for a connection, rather than fail as if
    Redis were down (redis-py's default pool raises "Too many connections")."""
    import redis.asyncio
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=5,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
    return redis.asyncio.Redis.from_pool(pool)


async def open_backends(settings: Settings, store: Store) -> Backends:
    """The ledger (started: loaded, or checked and seeded) and the bus the settings name."""
    check(settings)
    default = _usd(settings.default_session_budget_usd)
    global_budget = _usd(settings.global_budget_usd)
    if settings.redis_url is None:
        memory = MemoryLedger(
            settings.budget_thresholds,
            default,
            global_budget=global_budget,
            period=settings.global_budget_period,
            timezone=settings.budget_timezone,
        )
        await memory.start(store)
        return Backends(memory, MemoryBus(settings.event_history, settings.subscriber_queue))
    import redis.exceptions

    from spendgate.redis_bus import RedisEventBus
    from spendgate.redis_ledger import RedisLedger

    client = redis_client(settings.redis_url)
    try:
        ledger = RedisLedger(
            client,
            settings.budget_thresholds,
            default,
            global_budget=global_budget,
            period=settings.global_budget_period,
            timezone=settings.budget_timezone,
            lease_s=settings.reservation_lease_s,
            failure_mode=settings.ledger_failure_mode,
            event_history=settings.event_history,
        )
        try:
            await ledger.start(store)
        except (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise SharedSetupError(
                f"cannot reach Redis at {safe_url(settings.redis_url)}: {exc}"
            ) from None
        except RuntimeError as exc:  # the replicas disagree (thresholds), or seeding hung
            raise SharedSetupError(str(exc)) from None
        bus = RedisEventBus(
            client,
            replica_id=settings.replica_id,
            history=settings.event_history,
            queue_size=settings.subscriber_queue,
            batch=ledger.script_batch,
        )
        await bus.start()
    except BaseException:
        await client.aclose()
        raise
    return Backends(ledger, bus, client)
