"""The budget ledger of several replicas, in Redis (docs/reference.md §6 "Several
replicas").

The same rules as :class:`~spendgate.budgets.MemoryLedger` (scopes session, agent and
global; 402 when paused or spent ≥ budget; waiting in arrival order, then 429; 409 on
resume over budget; thresholds; calendar periods), each decision one atomic script
(:mod:`spendgate.redis_lua`), so N replicas share one budget exactly:

- a reservation is ``HINCRBY`` inside the admission script; its id is random and
  unique, so a retried admit or settle is recognised and changes nothing;
- a reservation carries a lease in Redis time, renewed while the request runs (every
  lease/3); a replica that dies stops renewing, and the next admission anywhere
  releases its reservations once the lease is over;
- counters are written only by the scripts: start-up seeds from the store only keys
  Redis does not hold, and only when Redis has never been seeded (``P meta``);
- money is integer units of 1e-10 USD, the rows' precision, and the Accountant rounds a
  message's cost to it once, so Redis spend equals the sum of the rows exactly;
- budget events are added to the event log by the script that flips the bit or pause.

Waiting is a ticket in the scope's queue in Redis (FIFO across replicas); the waiter
asks again every few milliseconds until admitted, refused, or its wait is over.
While Redis is unreachable, ``SPENDGATE_LEDGER_FAILURE_MODE=closed`` refuses with a
retryable 503; ``open`` admits and keeps the settles to send when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Coroutine
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import orjson

from spendgate import redis_lua
from spendgate.budgets import (
    AGENT,
    BUDGET,
    GLOBAL,
    MANUAL,
    SESSION,
    Change,
    Headroom,
    LedgerUnavailable,
    Pressure,
    Refusal,
    Reservation,
    ResumeRefused,
    SessionView,
    held_message,
    paused_message,
    resume_refused_message,
    scope_name,
)
from spendgate.events import session_label_event
from spendgate.periods import TOTAL, Period, period_at
from spendgate.records import AgentBudgetRecord, GlobalBudgetRecord, SessionRecord
from spendgate.redis_batch import ScriptBatch
from spendgate.redis_bus import UNIT, stop_tasks
from spendgate.store import COST_DIGITS

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from spendgate.store import Store

log = logging.getLogger("spendgate.redis_ledger")
P = ParamSpec("P")
T = TypeVar("T")

_ZERO = Decimal(0)
WAIT_POLL_S = (0.005, 0.05)
"""A waiter asks again after 5 ms, backing off to 50 ms."""
WAIT_TICKET_MS = 5_000
"""A waiting ticket nobody renews (its replica died) stops holding others after this."""
PENDING = 10_000
"""Settles kept while Redis is unreachable, at most; past this each drop is logged."""
CACHE = 10_000
"""Sessions whose last seen spend is kept for the hot path's sync reads."""
SEED_WAIT_S = 30.0
GAUGE_EVERY_S = 5.0
"""How often the shared gauges are read from Redis (by the replica reporting them)."""
BUDGETED_TTL_S = 2.0
"""How long this replica trusts that a request's scope has a budget."""
FIELDS = 7
"""A scope's state as the scripts return it: budget, spent, reserved, in flight,
paused, reason, label (redis_lua ``state``)."""
REDIS_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RConnectionError
    from redis.exceptions import TimeoutError as RTimeoutError

    return (*REDIS_ERRORS, RConnectionError, RTimeoutError)


def _shared(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """An API-facing call: Redis unreachable becomes :class:`LedgerUnavailable` (503).
    It first waits for the hot scripts this replica queued before it (a settle sent as a
    response went out), so a client reading after its response sees that response's
    spend, and a change it makes lands after it."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        ledger: Any = args[0]
        try:
            await ledger._batch.answered()
            return await method(*args, **kwargs)
        except _redis_errors() as exc:
            raise LedgerUnavailable(
                f"the shared budget ledger (Redis) cannot be reached: {exc}; retry shortly"
            ) from None

    return call


def units(amount: Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """USD as integer units of 1e-10 (reservations round up: never under-reserve)."""
    return int(amount.scaleb(COST_DIGITS).to_integral_value(rounding))  # a shift: exact


def usd(raw: bytes | str | None) -> Decimal:
    return Decimal(int(raw)) * UNIT if raw and raw != b"0" else _ZERO  # most spend reads 0


def _opt_usd(raw: bytes | str | None) -> Decimal | None:
    return Decimal(int(raw)) * UNIT if raw else None


def _now_arg() -> str:
    """Now as Unix seconds with milliseconds: the creation time every script that may
    create a session is given (without the float repr's digit search)."""
    ms = time.time_ns() // 1_000_000
    return f"{ms // 1000}.{ms % 1000:03d}"


def _s(raw: bytes | str | None) -> str:
    return "" if raw is None else raw.decode() if isinstance(raw, bytes) else raw


class _View:
    """A scope as a script returned it: budget, spent, reserved, in flight, pause.

    Budget and spend, which every admission and settle reads, are parsed at once; the
    rest only when asked (a refusal, the API): each admission returns two or three of
    these and the proxy reads five of their fields at most."""

    __slots__ = ("budget", "fields", "key", "kind", "spent")

    def __init__(self, key: str, fields: list[Any], prefix: str) -> None:
        self.key = key
        self.kind = _kind(key, prefix)
        self.fields = fields
        self.budget = _opt_usd(fields[0])
        self.spent = usd(fields[1])

    @property
    def reserved(self) -> Decimal:
        return usd(self.fields[2])

    @property
    def in_flight(self) -> int:
        return int(self.fields[3] or 0)

    @property
    def paused(self) -> bool:
        return _s(self.fields[4]) == "1"

    @property
    def reason(self) -> str | None:
        return _s(self.fields[5]) or None

    @property
    def label(self) -> str | None:
        return (_s(self.fields[6]) or None) if len(self.fields) > 6 else None


def _kind(key: str, prefix: str) -> str:
    rest = key[len(prefix) :]
    return GLOBAL if rest == "g" else AGENT if rest.startswith("a:") else SESSION


def _names(key: str, prefix: str) -> tuple[str | None, str | None]:
    rest = key[len(prefix) + 2 :]
    kind = _kind(key, prefix)
    if kind == GLOBAL:
        return None, None
    if kind == SESSION:
        return rest, None
    sid, _, aid = rest.partition("/")
    return sid, aid


class RedisLedger:
    """A :class:`~spendgate.budgets.BudgetLedger` shared through one Redis primary."""

    remote = True  # a settle is a round trip: the accountant sends it as the response goes

    def __init__(
        self,
        client: Redis,
        thresholds: list[float],
        default_budget: Decimal | None,
        *,
        global_budget: Decimal | None = None,
        period: str = TOTAL,
        timezone: str = "UTC",
        lease_s: float = 60.0,
        failure_mode: str = "closed",
        event_history: int = 2048,
        prefix: str = "spendgate:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r: Any = client  # redis-py's own types are loose; its replies are checked here
        self._p = prefix
        self._thresholds = sorted(thresholds)
        self._fractions = [Decimal(repr(t)) for t in self._thresholds]
        self._thresholds_arg = ",".join(repr(t) for t in self._thresholds)
        self._default = default_budget
        self._default_b, self._default_wa = self._budget_args(default_budget)
        self._configured = global_budget
        self._period_kind, self._timezone, self._clock = period, timezone, clock
        self._period = period_at(period, timezone, clock())
        self._lease_ms = max(1, int(lease_s * 1000))
        self._open = failure_mode == "open"
        self._maxlen = str(event_history)
        self._loaded_at = clock()
        self._spent: OrderedDict[str, Decimal] = OrderedDict()
        self._budgeted: dict[tuple[str, str | None], tuple[str, float]] = {}
        self._in_flight: dict[str, Reservation] = {}
        self._pending: deque[tuple[str, str, str, int]] = deque()
        self._dropped = 0
        self._paused_share = 0
        self._budgets_share: list[tuple[str, Decimal, Decimal]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._errors = _redis_errors()
        reg = client.register_script
        self._admit = reg(redis_lua.ADMIT)
        self._settle = reg(redis_lua.SETTLE)
        self._release = reg(redis_lua.RELEASE)
        self._renew = reg(redis_lua.RENEW)
        self._set_budget = reg(redis_lua.SET_BUDGET)
        self._pause = reg(redis_lua.PAUSE)
        self._roll = reg(redis_lua.ROLL)
        self._seed = reg(redis_lua.SEED)
        self._seed_agent = reg(redis_lua.SEED_AGENT)
        self._forget = reg(redis_lua.FORGET_TICKET)
        self._label = reg(redis_lua.SET_LABEL)
        self._forget_sessions = reg(redis_lua.FORGET)
        self._batch = ScriptBatch(client)  # the hot scripts, batched over one connection
        # Reservation ids: random per process, then a counter (unique across replicas and
        # restarts without a getrandom call per request).
        self._rid_prefix = secrets.token_hex(8) + "-"
        self._rid_seq = itertools.count(1)
        # The hot scripts take the replica's constants as one JSON argument made once and
        # the request's values as one more (redis_lua ADMIT, SETTLE): every argument sent
        # is formatted on its own, and these two scripts run for every request.
        self._prefix_arg = prefix.encode()
        self._admit_consts = orjson.dumps(
            [str(self._lease_ms), self._default_b, self._default_wa, str(WAIT_TICKET_MS),
             self._maxlen]
        )  # fmt: skip
        self._settle_consts = orjson.dumps([self._thresholds_arg, self._maxlen])

    # -- money and thresholds ---------------------------------------------------------------

    def _budget_args(self, budget: Decimal | None) -> tuple[str, str]:
        """A budget in units and its warning amounts (``ceil(budget × t)``, exact)."""
        if budget is None:
            return "", ""
        b = units(budget)
        return str(b), ",".join(str(math.ceil(b * d)) for d in self._fractions)

    def _period_arg(self) -> str:
        """The current global period's label, '' for ``total`` (never resets)."""
        if self._period is None:
            return ""
        now = self._clock()
        if now >= self._period.end:
            self._period = period_at(self._period_kind, self._timezone, now)
        return self._period.label if self._period is not None else ""

    @property
    def period(self) -> Period | None:
        self._period_arg()
        return self._period

    # -- start and stop ---------------------------------------------------------------------

    async def start(self, store: Store) -> None:
        """Check the shared settings, seed Redis from the store if it has never held
        this deployment's state (one replica does, under a lock; the others wait), and
        start the lease renewer."""
        meta = self._p + "meta"
        got = await self._r.hgetall(meta)
        if not got:
            if await self._r.set(self._p + "seed-lock", "1", nx=True, px=int(SEED_WAIT_S * 1000)):
                try:
                    await self._seed_from(store)
                finally:
                    await self._r.delete(self._p + "seed-lock")
            else:
                deadline = time.monotonic() + SEED_WAIT_S
                while not await self._r.exists(meta):
                    if time.monotonic() > deadline:
                        raise RuntimeError("another replica's seeding of Redis did not finish")
                    await asyncio.sleep(0.1)
            got = await self._r.hgetall(meta)
        theirs = _s(got.get(b"thresholds"))
        if theirs != self._thresholds_arg:
            raise RuntimeError(
                f"SPENDGATE_BUDGET_THRESHOLDS is {self._thresholds_arg or 'empty'} here but "
                f"{theirs or 'empty'} in the shared ledger: every replica needs the same"
            )
        self._loaded_at = float(_s(got.get(b"seeded_at")) or 0)
        await self._configure_global()
        self._tasks.append(asyncio.create_task(self._renewer()))
        self._tasks.append(asyncio.create_task(self._gauges()))
        if self._open:
            self._tasks.append(asyncio.create_task(self._reconciler()))

    async def _seed_from(self, store: Store) -> None:
        """Budgets, pauses and spend from the rows, written only where Redis has no key."""
        spend = await store.spend_by_session()
        sessions = await store.load_sessions()
        agents = await store.load_agent_budgets()
        agent_spend = await store.agent_spend((a.session_id, a.agent_id) for a in agents)
        period = self._period
        global_spend = await store.spend_since(period.start if period else None)
        global_rec = await store.load_global_budget()
        seeded = 0
        for srec in sessions:
            key = f"{self._p}s:{srec.id}"
            fields = self._seed_fields(srec.budget_usd, spend.get(srec.id, _ZERO))
            fields += ["p", "1" if srec.paused else "0", "r", srec.pause_reason or ""]
            fields += ["c", repr(srec.created_at)]
            if srec.label:
                fields += ["l", srec.label]
            seeded += await self._seed(args=[self._p, key, *fields])
            await self._r.zadd(self._p + "sessions", {srec.id: int(srec.created_at * 1000)})
            if srec.paused:
                await self._r.sadd(self._p + "paused", srec.id)
            if srec.budget_usd is not None:
                await self._r.sadd(self._p + "budgeted", srec.id)
        for arec in agents:
            key = f"{self._p}a:{arec.session_id}/{arec.agent_id}"
            spent = agent_spend.get((arec.session_id, arec.agent_id), _ZERO)
            fields = self._seed_fields(arec.budget_usd, spent)
            over = arec.budget_usd is not None and spent >= arec.budget_usd
            fields += ["p", "1" if over else "0", "r", BUDGET if over else "", "sd", "1"]
            seeded += await self._seed(args=[self._p, key, *fields])
            if arec.budget_usd is not None:
                await self._r.sadd(f"{self._p}ab:{arec.session_id}", arec.agent_id)
        budget = self._configured
        if global_rec is not None and global_rec.configured == self._configured:
            budget = global_rec.budget_usd
        fields = self._seed_fields(budget, global_spend)
        over = budget is not None and global_spend >= budget
        cfg = "" if self._configured is None else str(units(self._configured))
        fields += ["p", "1" if over else "0", "r", BUDGET if over else ""]
        fields += ["per", self._period_arg(), "cfg", cfg]
        await self._seed(args=[self._p, self._p + "g", *fields])
        await self._r.hset(
            self._p + "meta",
            mapping={"thresholds": self._thresholds_arg, "seeded_at": repr(self._clock())},
        )
        log.info("shared ledger seeded from the store: %d sessions and agents", seeded)

    def _seed_fields(self, budget: Decimal | None, spent: Decimal) -> list[str]:
        b, wa = self._budget_args(budget)
        sp = units(spent)
        bits = 0
        if b:
            for i, at in enumerate(wa.split(",") if wa else []):
                if sp >= int(at):
                    bits |= 1 << i  # crossed before: do not warn again
        out = ["sp", str(sp), "rv", "0", "n", "0", "w", str(bits)]
        if b:
            out += ["b", b, "wa", wa]
        return out

    async def _configure_global(self) -> None:
        """``SPENDGATE_GLOBAL_BUDGET_USD`` changed since the budget in Redis was set:
        the setting wins (as with one process, an API budget lasts until it changes)."""
        cfg = "" if self._configured is None else str(units(self._configured))
        have = await self._r.hmget(self._p + "g", ["cfg"])
        if await self._r.exists(self._p + "g") and _s(have[0]) == cfg:
            return
        b, wa = self._budget_args(self._configured)
        await self._call(self._set_budget, GLOBAL, "", "", b, wa, cfg)

    async def close(self) -> None:
        await stop_tasks(self._tasks)
        if self._pending:
            with contextlib.suppress(Exception):
                await self._send_pending()
            if self._pending:
                log.error(
                    "%d settles could not reach Redis before shutdown: their spend is in "
                    "the rows but not in the shared ledger",
                    len(self._pending),
                )
        await self._batch.close()  # last: the bus (closed before) shares it

    # -- scripts ----------------------------------------------------------------------------

    async def _call(self, script: Any, kind: str, sid: str, aid: str, b: str, wa: str,
                    cfg: str = "-") -> list[Any]:  # fmt: skip
        args = [
            self._p,
            kind,
            sid,
            aid,
            b,
            wa,
            self._default_b,
            self._default_wa,
            _now_arg(),
            self._period_arg(),
            self._maxlen,
            cfg,
        ]
        out: list[Any] = await script(args=args)
        return out

    def _remember(self, sid: str, spent: Decimal) -> None:
        cache = self._spent
        cache[sid] = spent
        cache.move_to_end(sid)
        if len(cache) > CACHE:
            cache.popitem(last=False)

    @staticmethod
    def _views(out: list[Any], start: int, prefix: str, step: int) -> list[tuple[_View, bool]]:
        views = []
        for i in range(start, len(out), step):
            key = _s(out[i])
            flag = step == FIELDS + 2 and _s(out[i + FIELDS + 1]) == "1"
            views.append((_View(key, out[i + 1 : i + 1 + FIELDS], prefix), flag))
        return views

    def _record(self, view: _View, created_at: float | None = None) -> SessionRecord:
        sid, _ = _names(view.key, self._p)
        assert sid is not None
        return SessionRecord(sid, created_at or time.time(), view.budget, view.paused, view.reason)

    def _any_record(self, view: _View) -> SessionRecord | AgentBudgetRecord | GlobalBudgetRecord:
        sid, aid = _names(view.key, self._p)
        if view.kind == GLOBAL:
            return GlobalBudgetRecord(view.budget, view.paused, view.reason, self._configured)
        if view.kind == AGENT:
            assert sid is not None and aid is not None
            return AgentBudgetRecord(sid, aid, view.budget, view.paused, view.reason)
        return self._record(view)

    # -- admission --------------------------------------------------------------------------

    async def budgeted(self, session_id: str, agent_id: str | None) -> str | None:
        """The first budgeted scope of such a request. A scope seen budgeted in the last
        few seconds is taken from this replica's memory (a stale yes only reserves
        against a budget just lifted); a no is always asked of Redis, so a budget set on
        another replica is reserved against at once."""
        key = (session_id, agent_id)
        hit = self._budgeted.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < BUDGETED_TTL_S:
            return hit[0]
        scope = await self._budgeted_now(session_id, agent_id)
        if scope is not None:
            if len(self._budgeted) >= CACHE:
                self._budgeted.clear()
            self._budgeted[key] = (scope, now)
        return scope

    async def _budgeted_now(self, session_id: str, agent_id: str | None) -> str | None:
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(f"{self._p}s:{session_id}", ["b", "c"])
        if agent_id is not None:
            pipe.hget(f"{self._p}a:{session_id}/{agent_id}", "b")
        pipe.hget(self._p + "g", "b")
        try:
            got = await pipe.execute()
        except self._errors:
            return SESSION if self._default is not None else None
        (sb, created), *rest = got
        if sb is not None or (created is None and self._default is not None):
            return SESSION
        if agent_id is not None and rest[0] is not None:
            return AGENT
        return GLOBAL if rest[-1] is not None else None

    async def admit(
        self, session_id: str, agent_id: str | None, reserve: Decimal, wait: float = 0.0
    ) -> tuple[Reservation | Refusal, Change]:
        change = Change()
        rid = f"{self._rid_prefix}{next(self._rid_seq)}"
        amount = units(reserve, ROUND_CEILING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        ticket, delay = "", WAIT_POLL_S[0]
        try:
            while True:
                request = [session_id, agent_id or "", rid, str(amount), _now_arg(),
                           self._period_arg(), ticket, "1" if wait > 0 else "0"]  # fmt: skip
                out = await self._batch.run(
                    self._admit, (self._prefix_arg, self._admit_consts, orjson.dumps(request))
                )
                status, created, why, ticket = _s(out[0]), _s(out[1]), _s(out[2]), _s(out[3])
                views = self._views(out, 4, self._p, FIELDS + 2)
                if created == "1":
                    change.saved(self._record(views[0][0]))
                    created = "0"  # saved once, however often it asks
                self._remember(session_id, views[0][0].spent)
                if status in ("admitted", "dup"):
                    res = Reservation(
                        rid, session_id, agent_id, reserve, tuple(v for v, _ in views)
                    )
                    self._in_flight[rid] = res
                    return res, change
                scope = next(v for v, on in views if on)
                if status == "refused" or loop.time() >= deadline:
                    if ticket:
                        await self._forget(args=[self._p, ticket])
                    return self._refusal(scope, why, session_id, reserve), change
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, WAIT_POLL_S[1])
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                if ticket:
                    await self._forget(args=[self._p, ticket])
                if rid in self._in_flight:
                    self.release(self._in_flight[rid])
            raise
        except self._errors as exc:
            return self._unreachable(exc, session_id, agent_id, rid, reserve), change

    def _unreachable(
        self, exc: BaseException, sid: str, agent_id: str | None, rid: str, reserve: Decimal
    ) -> Reservation | Refusal:
        if self._open:
            log.warning("Redis unreachable (%s): admitting %s unmetered (failure mode open)",
                        exc, sid)  # fmt: skip
            res = Reservation(rid, sid, agent_id, reserve, ())
            return res
        log.warning("Redis unreachable (%s): refusing with 503 (failure mode closed)", exc)
        text = (
            "spendgate cannot reach its shared budget ledger (Redis), so it cannot tell "
            "whether this request fits the budget: retry shortly."
        )
        return Refusal(503, "ledger_unavailable", SESSION, sid, None, self.cached_spent(sid), text)

    def _refusal(self, view: _View, why: str, session_id: str, amount: Decimal) -> Refusal:
        sid, aid = _names(view.key, self._p)
        name = scope_name(view.kind, sid, aid, self._period)
        if why == "held":
            assert view.budget is not None
            text = held_message(
                view.in_flight, view.reserved, view.budget, view.spent, name, amount
            )
            return Refusal(429, "budget_reserved", view.kind, session_id, view.budget,
                           view.spent, text)  # fmt: skip
        text = paused_message(view.kind, sid, aid, view.budget, view.spent, why, self._period)
        return Refusal(402, f"{view.kind}_budget_exceeded", view.kind, session_id,
                       view.budget, view.spent, text)  # fmt: skip

    def release(self, reservation: Reservation) -> None:
        """Give the headroom back without spending (the request never ran)."""
        if not reservation.open:
            return
        reservation.open = False
        self._in_flight.pop(reservation.id, None)
        task = asyncio.ensure_future(self._release_now(reservation.id))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _release_now(self, rid: str) -> None:
        try:
            await self._release(args=[self._p, rid])
        except self._errors as exc:  # its lease runs out instead
            log.warning("could not release reservation %s now (%s): its lease will", rid, exc)

    # -- settling ---------------------------------------------------------------------------

    async def settle(self, reservation: Reservation, cost: Decimal | None) -> Change:
        change = Change()
        if not reservation.open:
            return change
        reservation.open = False
        self._in_flight.pop(reservation.id, None)
        cost_u = units(cost) if cost else 0
        item = (reservation.id, reservation.session_id, reservation.agent_id or "", cost_u)
        try:
            out = await self._send_settle(item)
        except self._errors as exc:
            self._keep(item, exc)
            change.spent = self.cached_spent(reservation.session_id) + (cost or _ZERO)
            return change
        spent = usd(out[1])
        self._remember(reservation.session_id, spent)
        change.spent = spent
        for view, _ in self._views(out, 2, self._p, FIELDS + 1):  # the scopes it paused
            change.saved(self._any_record(view))
        return change

    async def _send_settle(self, item: tuple[str, str, str, int]) -> list[Any]:
        rid, sid, aid, cost_u = item
        request = orjson.dumps([rid, sid, aid, str(cost_u), self._period_arg()])
        out: list[Any] = await self._batch.run(
            self._settle, (self._prefix_arg, self._settle_consts, request)
        )
        return out

    def _keep(self, item: tuple[str, str, str, int], exc: BaseException) -> None:
        """A settle Redis did not take: kept (bounded) and sent again, idempotently."""
        if len(self._pending) >= PENDING:
            self._pending.popleft()
            self._dropped += 1
            log.error("Redis unreachable: %d settles dropped so far (kept at most %d)",
                      self._dropped, PENDING)  # fmt: skip
        self._pending.append(item)
        log.warning("Redis unreachable (%s): %d settles kept to send later",
                    exc, len(self._pending))  # fmt: skip
        if not self._open and not any(t.get_name() == "reconcile" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self._reconciler(), name="reconcile"))

    async def _send_pending(self) -> None:
        while self._pending:
            await self._send_settle(self._pending[0])
            self._pending.popleft()

    async def _reconciler(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._pending:
                try:
                    await self._send_pending()
                    log.info("Redis reachable again: every kept settle is sent")
                except self._errors:
                    continue

    async def _renewer(self) -> None:
        """Renew the leases of this replica's in-flight reservations every lease/3."""
        every = self._lease_ms / 3000
        while True:
            await asyncio.sleep(every)
            rids = [r for r, res in self._in_flight.items() if res._scopes]
            if not rids:
                continue
            try:
                for i in range(0, len(rids), 500):
                    await self._renew(args=[self._p, self._lease_ms, *rids[i : i + 500]])
            except self._errors as exc:
                log.warning("could not renew %d reservation leases: %s", len(rids), exc)

    # -- budgets and pauses -----------------------------------------------------------------

    def _changed(self, out: list[Any], start: int, change: Change) -> _View:
        view = _View(_s(out[start]), out[start + 1 : start + 1 + FIELDS], self._p)
        change.saved(self._any_record(view))
        return view

    @_shared
    async def set_budget(self, session_id: str, budget: Decimal | None) -> Change:
        change = Change()
        b, wa = self._budget_args(budget)
        out = await self._call(self._set_budget, SESSION, session_id, "", b, wa)
        self._remember(session_id, self._changed(out, 1, change).spent)
        return change

    @_shared
    async def set_agent_budget(
        self, session_id: str, agent_id: str, budget: Decimal | None
    ) -> Change:
        change = Change()
        b, wa = self._budget_args(budget)
        out = await self._call(self._set_budget, AGENT, session_id, agent_id, b, wa)
        if _s(out[0]) == "1":
            view = await self.snapshot(session_id)
            if view is not None:
                change.saved(view.record)
        self._changed(out, 1, change)
        return change

    @_shared
    async def set_global_budget(self, budget: Decimal | None) -> Change:
        change = Change()
        b, wa = self._budget_args(budget)
        out = await self._call(self._set_budget, GLOBAL, "", "", b, wa)
        self._changed(out, 1, change)
        return change

    @property
    def script_batch(self) -> ScriptBatch:
        """The batch its hot scripts go through, for the event bus on the same client."""
        return self._batch

    @property
    def loaded_at(self) -> float:
        """When Redis was seeded from the rows: an agent's rows from before this are not
        in its Redis spend until :meth:`seed_agent`."""
        return self._loaded_at

    @_shared
    async def unseeded_agent(self, session_id: str, agent_id: str) -> bool:
        got = await self._r.hget(f"{self._p}a:{session_id}/{agent_id}", "sd")
        return _s(got) != "1"

    @_shared
    async def seed_agent(self, session_id: str, agent_id: str, before: Decimal) -> None:
        await self._seed_agent(args=[self._p, session_id, agent_id, units(before)])

    @_shared
    async def set_label(self, session_id: str, label: str | None) -> Change:
        """Set (None: clear) the session's label; nothing changes when it has it already."""
        change = Change()
        out = await self._label(
            args=[self._p, session_id, label or "", self._default_b, self._default_wa,
                  _now_arg()]
        )  # fmt: skip
        view = _View(f"{self._p}s:{session_id}", out[2 : 2 + FIELDS], self._p)
        if _s(out[0]) == "1" or _s(out[1]) == "1":
            change.saved(self._record(view))
        if _s(out[0]) == "1":
            change.events.append(session_label_event(session_id, label))
        return change

    @_shared
    async def busy_sessions(self) -> set[str]:
        """Sessions holding a reservation or a waiting ticket, on any replica."""
        busy: set[str] = set()
        session_key = self._p + "s:"
        held = await self._r.hvals(self._p + "rs")
        waiting = await self._r.hvals(self._p + "wx")
        for raw in [*held, *waiting]:
            for part in _s(raw).replace("|", " ").split():
                if part.startswith(self._p + "w:"):
                    part = part[len(self._p) + 2 :]
                if part.startswith(session_key):
                    busy.add(part[len(session_key) :])
                elif part.startswith(self._p + "a:"):
                    busy.add(part[len(self._p) + 2 :].partition("/")[0])
        return busy

    @_shared
    async def forget(self, session_ids: Collection[str], global_spend: Decimal) -> Change:
        """Sessions removed from the store (docs/reference.md §5 "Removing old sessions"):
        their keys go, and the global spend loses ``global_spend`` (one script)."""
        ids = list(session_ids)
        agents: list[str] = []
        for sid in ids:
            async for key in self._r.scan_iter(match=f"{self._p}a:{sid}/*", count=500):
                agents.append(_s(key))
        await self._forget_sessions(
            args=[self._p, units(global_spend), self._maxlen, *ids, "--", *agents]
        )
        for sid in ids:
            self._spent.pop(sid, None)
        return Change()

    @_shared
    async def pause(self, session_id: str, reason: str = MANUAL) -> Change:
        return await self._pause_or_resume(session_id, "1", reason)

    @_shared
    async def resume(self, session_id: str) -> Change:
        return await self._pause_or_resume(session_id, "0", "")

    async def _pause_or_resume(self, session_id: str, on: str, reason: str) -> Change:
        change = Change()
        out = await self._pause(
            args=[
                self._p,
                session_id,
                on,
                reason,
                self._default_b,
                self._default_wa,
                _now_arg(),
                self._maxlen,
            ]
        )
        view = _View(f"{self._p}s:{session_id}", out[2 : 2 + FIELDS], self._p)
        if _s(out[0]) == "refused":
            assert view.budget is not None
            raise ResumeRefused(resume_refused_message(session_id, view.spent, view.budget))
        change.saved(self._record(view))
        self._remember(session_id, view.spent)
        return change

    # -- reads ------------------------------------------------------------------------------

    @_shared
    async def snapshot(self, session_id: str) -> SessionView | None:
        key = f"{self._p}s:{session_id}"
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(key, ["b", "sp", "rv", "n", "p", "r", "l", "c"])
        pipe.zcard(f"{self._p}w:{key}")
        fields, waiting = await pipe.execute()
        if fields[1] is None:
            return None
        view = _View(key, fields[:FIELDS], self._p)
        created = float(_s(fields[FIELDS]) or 0)
        self._remember(session_id, view.spent)
        rec = self._record(view, created)
        return SessionView(rec, view.spent, Pressure(view.in_flight, view.reserved, waiting))

    @_shared
    async def spent_of(self, session_ids: Collection[str]) -> dict[str, Decimal]:
        ids = list(session_ids)
        pipe = self._r.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(f"{self._p}s:{sid}", "sp")
        got = await pipe.execute() if ids else []
        return {sid: usd(v) for sid, v in zip(ids, got, strict=True)}

    @_shared
    async def agent_budgets(self, session_id: str) -> list[tuple[AgentBudgetRecord, Decimal]]:
        agents = sorted(_s(a) for a in await self._r.smembers(f"{self._p}ab:{session_id}"))
        pipe = self._r.pipeline(transaction=False)
        for aid in agents:
            pipe.hmget(f"{self._p}a:{session_id}/{aid}", ["b", "sp", "rv", "n", "p", "r"])
        out = []
        for aid, fields in zip(agents, await pipe.execute() if agents else [], strict=True):
            view = _View(f"{self._p}a:{session_id}/{aid}", fields, self._p)
            if view.budget is not None:
                rec = AgentBudgetRecord(session_id, aid, view.budget, view.paused, view.reason)
                out.append((rec, view.spent))
        return out

    @_shared
    async def global_budget(self) -> tuple[GlobalBudgetRecord, Decimal, Period | None, Change]:
        change = Change()
        fields = await self._roll(args=[self._p, self._period_arg(), self._maxlen])
        view = _View(self._p + "g", fields, self._p)
        rec = GlobalBudgetRecord(view.budget, view.paused, view.reason, self._configured)
        return rec, view.spent, self._period, change

    @_shared
    async def pressure(self, session_id: str | None, agent_id: str | None = None) -> Pressure:
        if session_id is None:
            key = self._p + "g"
        elif agent_id is None:
            key = f"{self._p}s:{session_id}"
        else:
            key = f"{self._p}a:{session_id}/{agent_id}"
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(key, ["n", "rv"])
        pipe.zcard(f"{self._p}w:{key}")
        (n, rv), waiting = await pipe.execute()
        return Pressure(int(n or 0), usd(rv), waiting)

    def cached_spent(self, session_id: str) -> Decimal:
        """The spend this replica last saw (admission, settle, a read): live events and
        messages only; every decision is taken in Redis."""
        return self._spent.get(session_id, _ZERO)

    def live_remaining(self, reservation: Reservation) -> Headroom | None:
        """As of the request's admission (its scopes' budget less spent then)."""
        least: Headroom | None = None
        for view in reservation._scopes:
            budget = view.budget
            if budget is not None and (least is None or budget - view.spent < least.left):
                sid, aid = _names(view.key, self._p)
                least = Headroom(
                    budget - view.spent, view.kind, scope_name(view.kind, sid, aid, self._period)
                )
        return least

    # -- gauges -----------------------------------------------------------------------------

    @property
    def paused_count(self) -> int:
        return self._paused_share

    def budgets(self) -> list[tuple[str, Decimal, Decimal]]:
        return self._budgets_share

    async def _gauges(self) -> None:
        """One replica at a time (a 15 s lease in Redis) reports the shared gauges;
        the others report none, so summing over replicas counts each session once."""
        me = secrets.token_hex(8)
        lock = self._p + "gauge-lock"
        while True:
            try:
                mine = await self._r.set(lock, me, nx=True, px=15_000)
                if not mine and _s(await self._r.get(lock)) == me:
                    await self._r.pexpire(lock, 15_000)
                    mine = True
                if mine:
                    self._paused_share = int(await self._r.scard(self._p + "paused"))
                    self._budgets_share = await self._budget_series()
                else:
                    self._paused_share, self._budgets_share = 0, []
            except self._errors as exc:
                log.debug("gauges: %s", exc)
            await asyncio.sleep(GAUGE_EVERY_S)

    async def _budget_series(self, limit: int = 1000) -> list[tuple[str, Decimal, Decimal]]:
        sids = [_s(s) for s in await self._r.srandmember(self._p + "budgeted", limit) or []]
        pipe = self._r.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(f"{self._p}s:{sid}", ["b", "sp"])
        out = []
        for sid, (b, sp) in zip(sids, await pipe.execute() if sids else [], strict=True):
            if b is not None:
                out.append((sid, usd(b), usd(sp)))
        return out
