"""The budget ledger seam: admission, reservations and spend at three scopes — a session,
an agent inside a session, and everything (the global budget, optionally per calendar
period) (docs/reference.md §6). No HTTP, no SQL.

A request belongs to its session's scope, its agent's scope when it names an agent, and
the global scope; it is admitted only if every one of them admits it:

- **402** (a :class:`Refusal` with ``status`` 402) when a scope is paused or its *spent*
  cost has reached its budget;
- it **waits** when spent is below the budget but the other in-flight requests'
  reservations hold the headroom (spent + theirs + its own would pass the budget; a
  request alone in its scope is always admitted). Waiters are admitted in
  arrival order as reservations settle; when the wait runs out the refusal is a
  **429** that says how much is held, by how many requests.

Admission and reservation happen in one step with no await in between, so a burst of
concurrent requests cannot all see the same spare budget. Every change is returned as
events plus the records to persist; the caller publishes and persists them.
:class:`spendgate.redis_ledger.RedisLedger` implements the same protocol for several
replicas sharing one budget (docs/reference.md §6 "Several replicas"), so callers read
nothing that assumes this process is the authority: spend comes back from ``settle``
(:attr:`Change.spent`), the API reads through the async :meth:`BudgetLedger.snapshot`,
and the hot path's sync reads (:meth:`BudgetLedger.cached_spent`,
:meth:`BudgetLedger.live_remaining`) are documented as possibly a little behind.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from spendgate.events import (
    BUDGET_PAUSED,
    BUDGET_RESUMED,
    BUDGET_WARNING,
    Event,
    budget_event,
    session_label_event,
)
from spendgate.periods import TOTAL, Period, period_at
from spendgate.records import AgentBudgetRecord, GlobalBudgetRecord, SessionRecord

if TYPE_CHECKING:
    from spendgate.store import Store

MANUAL = "manual"
BUDGET = "budget"
SESSION, AGENT, GLOBAL = "session", "agent", "global"

BudgetRecord = SessionRecord | AgentBudgetRecord | GlobalBudgetRecord
_ZERO = Decimal(0)


def usd(amount: Decimal) -> str:
    """Dollars for people: cents when that is exact enough, else up to six decimals.

    The exact amount of a ``Decimal``, for messages (the 402 refusal says "spent $0.0004");
    tables of floats use :func:`spendgate.render.usd`, which pads to a fixed precision.
    """
    if amount == amount.quantize(Decimal("0.01")):
        return f"${amount:,.2f}"
    return "$" + format(amount.quantize(Decimal("0.000001")).normalize(), "f")


def scope_name(
    kind: str, session_id: str | None, agent_id: str | None, period: Period | None
) -> str:
    """A scope for people: ``session 'run-1'``, ``agent 'a' of session 'run-1'``, ..."""
    if kind == SESSION:
        return f"session '{session_id}'"
    if kind == AGENT:
        return f"agent '{agent_id}' of session '{session_id}'"
    return "the global budget" + (f" ({period.label})" if period is not None else "")


def held_message(
    in_flight: int, reserved: Decimal, budget: Decimal, spent: Decimal, name: str, amount: Decimal
) -> str:
    """The 429's text: what the in-flight requests hold of what is left."""
    n = in_flight
    verb = "hold" if n != 1 else "holds"
    return (
        f"{n} request{'s' if n != 1 else ''} in flight {verb} {usd(reserved)} of "
        f"the {usd(max(budget - spent, _ZERO))} left in {name}, and this "
        f"request may cost up to {usd(amount)}: retry when they finish, or raise the budget."
    )


def paused_message(
    kind: str,
    sid: str | None,
    aid: str | None,
    budget: Decimal | None,
    spent_usd: Decimal,
    why: str,
    period: Period | None,
) -> str:
    """The 402's text: which scope is paused or spent, and how to continue."""
    of = "no budget" if budget is None else f"a {usd(budget)} budget"
    spent = f"spent {usd(spent_usd)} of {of}"
    if kind == GLOBAL:
        when = (
            ""
            if period is None
            else f" for {period.label}; it starts again with the next {period.name}"
        )
        return (
            f"spendgate paused every session: the global budget is used up ({spent}"
            f"{when}). To continue, raise it (PUT /api/budget or "
            f"`spendgate budget --global USD`)."
        )
    if kind == AGENT:
        return (
            f"spendgate paused agent '{aid}' of session '{sid}': it has used up its budget "
            f"({spent}). To continue, raise its budget (PUT /api/sessions/{sid}/agents/"
            f"{aid}/budget or `spendgate budget {sid} USD --agent {aid}`)."
        )
    how = "was paused by hand" if why == MANUAL else "has used up its budget"
    resume = ""
    if why == MANUAL:
        resume = f" or resume it (POST /api/sessions/{sid}/resume or `spendgate resume {sid}`)"
    return (
        f"spendgate paused session '{sid}': it {how} ({spent}). To continue, raise the "
        f"budget (PUT /api/sessions/{sid}/budget or `spendgate budget {sid} USD`){resume}."
    )


def resume_refused_message(session_id: str, spent: Decimal, budget: Decimal) -> str:
    """The 409's text: resuming at or over the budget would only pause it again."""
    return (
        f"session '{session_id}' has spent {usd(spent)} of its {usd(budget)} "
        f"budget, so resuming would only pause it again: raise the budget instead "
        f"(`spendgate budget {session_id} USD` or PUT /api/sessions/{session_id}/budget)."
    )


@dataclass(slots=True, eq=False)
class _Scope:
    """One budget's live state: its record (budget and pause), spend and reservations."""

    kind: str
    record: BudgetRecord
    session_id: str | None = None
    agent_id: str | None = None
    spent: Decimal = _ZERO
    reserved_total: Decimal = _ZERO
    """What the in-flight requests of this scope reserved, kept as they come and go."""
    in_flight: int = 0
    seeded: bool = True
    """Its spend includes what was spent before this process started (an agent first
    seen since then is not, until :meth:`MemoryLedger.seed_agent`)."""
    warned: set[float] = field(default_factory=set)
    next_warning_at: Decimal | None = None
    """Spend at which the lowest threshold not yet warned about is crossed (None: none)."""


class Reservation:
    """What an admitted request holds against its scopes until it is settled."""

    __slots__ = ("_scopes", "agent_id", "amount", "id", "open", "session_id")

    def __init__(
        self,
        id: str,
        session_id: str,
        agent_id: str | None,
        amount: Decimal,
        scopes: tuple[Any, ...] = (),
    ) -> None:
        self.id = id
        """Unique across replicas and restarts: a retried settle is recognised by it."""
        self.session_id = session_id
        self.agent_id = agent_id
        self.amount = amount
        self.open = True
        """False once settled or released: a second settle changes nothing."""
        self._scopes = scopes
        """The ledger's own view of the scopes it holds (opaque to callers)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not admitted, with everything its HTTP answer says."""

    status: int
    """402 (paused, spent, unpriced), 429 (headroom held by in-flight requests) or 503
    (a shared ledger that cannot be reached, failure mode ``closed``)."""
    code: str
    """``session_budget_exceeded``, ``agent_budget_exceeded``, ``global_budget_exceeded``,
    ``budget_reserved``, ``model_unpriced`` or ``ledger_unavailable``."""
    scope: str
    session_id: str
    budget_usd: Decimal | None
    spent_usd: Decimal
    text: str

    @property
    def retry(self) -> bool:
        """May the client retry? A wait for reservations ends, and so does a ledger
        outage; a pause does not."""
        return self.status in (429, 503)

    def message(self) -> str:
        return self.text


class Headroom(NamedTuple):
    """What a budget has left, for the mid-stream cut."""

    left: Decimal
    scope: str
    name: str
    """For people: ``session 'run-1'``, ``agent 'a' of session 'run-1'``, ..."""


class Pressure(NamedTuple):
    """What holds a scope's headroom right now (for the API and the status line)."""

    in_flight: int
    reserved: Decimal
    waiting: int
    """Requests queued for this scope's headroom."""


class LedgerUnavailable(Exception):
    """A shared ledger that cannot be reached now (the API answers 503, retryable)."""


class ResumeRefused(Exception):
    """Resuming would admit requests the budget has no room for (the API answers 409)."""


@dataclass(slots=True)
class Change:
    """What a ledger operation changed: the records to persist, and events."""

    records: list[BudgetRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    spent: Decimal | None = None
    """After a settle: the session's spend including this message (its ``token.usage``
    ``sessionCostUsd``), from the same step that added it; None if nothing was settled."""

    def saved(self, rec: BudgetRecord) -> None:
        if not any(r is rec for r in self.records):
            self.records.append(rec)


class SessionView(NamedTuple):
    """A session as the ledger that holds it sees it now (for the API)."""

    record: SessionRecord
    spent: Decimal
    pressure: Pressure


class BudgetLedger(Protocol):
    """The seam between requests and budgets (docs/reference.md §6). Everything async may
    ask a shared server; the few sync reads are for the hot path and may be a little
    behind another replica's latest settle (each says how far)."""

    remote: bool
    """Is a settle a round trip to a shared server? Then the accountant settles after the
    response has gone (its row queued before), so a client waits for one trip, not two."""

    async def start(self, store: Store) -> None:
        """Take up the state: the memory ledger loads it from the store; a shared one
        seeds only what its server has never held (never over live counters)."""

    async def close(self) -> None: ...

    async def budgeted(self, session_id: str, agent_id: str | None) -> str | None: ...

    async def admit(
        self, session_id: str, agent_id: str | None, reserve: Decimal, wait: float = 0.0
    ) -> tuple[Reservation | Refusal, Change]: ...

    async def settle(self, reservation: Reservation, cost: Decimal | None) -> Change: ...

    async def set_budget(self, session_id: str, budget: Decimal | None) -> Change: ...

    async def set_agent_budget(
        self, session_id: str, agent_id: str, budget: Decimal | None
    ) -> Change: ...

    @property
    def loaded_at(self) -> float: ...

    async def unseeded_agent(self, session_id: str, agent_id: str) -> bool: ...

    async def seed_agent(self, session_id: str, agent_id: str, before: Decimal) -> None: ...

    async def set_global_budget(self, budget: Decimal | None) -> Change: ...

    async def set_label(self, session_id: str, label: str | None) -> Change: ...

    async def busy_sessions(self) -> set[str]:
        """Sessions with requests in flight or waiting (not to be removed now)."""

    async def forget(self, session_ids: Collection[str], global_spend: Decimal) -> Change: ...

    async def pause(self, session_id: str, reason: str = MANUAL) -> Change: ...

    async def resume(self, session_id: str) -> Change: ...

    async def snapshot(self, session_id: str) -> SessionView | None:
        """The session, its spend and pressure; None for a session no replica has seen."""

    async def spent_of(self, session_ids: Collection[str]) -> dict[str, Decimal]: ...

    async def agent_budgets(self, session_id: str) -> list[tuple[AgentBudgetRecord, Decimal]]: ...

    async def global_budget(self) -> tuple[GlobalBudgetRecord, Decimal, Period | None, Change]: ...

    async def pressure(self, session_id: str | None, agent_id: str | None = None) -> Pressure: ...

    def cached_spent(self, session_id: str) -> Decimal:
        """The session's spend as this process last saw it (live events, messages)."""

    def live_remaining(self, reservation: Reservation) -> Headroom | None:
        """What the request's tightest budget has left, as of its admission or a later
        refresh (the mid-stream cut)."""

    @property
    def paused_count(self) -> int:
        """This process's share of the paused-sessions gauge: summed over replicas it
        counts each paused session once."""

    def budgets(self) -> list[tuple[str, Decimal, Decimal]]:
        """This process's share of the per-session budget series (as ``paused_count``)."""


@dataclass(slots=True, eq=False)
class _Waiter:
    scopes: tuple[_Scope, ...]
    session_id: str
    agent_id: str | None
    reserve: Decimal
    held_on: _Scope
    """The scope whose headroom it waits for."""
    future: asyncio.Future[Reservation | Refusal]


_HELD = "held"


class MemoryLedger:
    remote = False  # a settle is a few additions in this process

    def __init__(
        self,
        thresholds: list[float],
        default_budget: Decimal | None,
        *,
        global_budget: Decimal | None = None,
        period: str = TOTAL,
        timezone: str = "UTC",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._thresholds = sorted(thresholds)
        self._fractions = [(t, Decimal(repr(t))) for t in self._thresholds]
        self._default_budget = default_budget
        self._sessions: dict[str, _Scope] = {}
        self._agents: dict[tuple[str, str], _Scope] = {}
        self._global = _Scope(GLOBAL, GlobalBudgetRecord(global_budget, configured=global_budget))
        self._arm(self._global)
        self._period_kind, self._timezone, self._clock = period, timezone, clock
        self._period = period_at(period, timezone, clock())
        self._waiters: deque[_Waiter] = deque()
        self._ids = itertools.count(1)
        self._id_prefix = f"{time.time_ns():x}-"
        """Reservation ids unique across restarts, as the protocol asks."""
        self._loaded_at = clock()

    @property
    def period(self) -> Period | None:
        """The global budget's current period (None: ``total``, never reset)."""
        return self._period

    async def start(self, store: Store) -> None:
        """Load budgets, spend and pauses from the store (this process is the authority)."""
        period = self._period
        agents = await store.load_agent_budgets()
        self.load(
            await store.load_sessions(),
            await store.spend_by_session(),
            agents=agents,
            agent_spend=await store.agent_spend((a.session_id, a.agent_id) for a in agents),
            global_record=await store.load_global_budget(),
            global_spend=await store.spend_since(period.start if period else None),
        )

    async def close(self) -> None:
        """Nothing to let go: the state is this process's memory."""

    def load(
        self,
        sessions: list[SessionRecord],
        spend: dict[str, Decimal],
        *,
        agents: list[AgentBudgetRecord] = (),  # type: ignore[assignment]
        agent_spend: dict[tuple[str, str], Decimal] | None = None,
        global_record: GlobalBudgetRecord | None = None,
        global_spend: Decimal = _ZERO,
    ) -> None:
        """Restore state after a restart: budgets, spend and pauses survive, warnings
        don't refire. ``agent_spend`` is that of the agents in ``agents`` (those with a
        budget; others are seeded when budgeted, :meth:`seed_agent`), ``global_spend``
        that of the current period.

        A global budget saved through the API wins over ``SPENDGATE_GLOBAL_BUDGET_USD``
        until that setting changes (``configured`` remembers what it was)."""
        for srec in sessions:
            spent = spend.get(srec.id, _ZERO)
            self._sessions[srec.id] = self._restored(_Scope(SESSION, srec, srec.id), spent)
        self._loaded_at = self._clock()
        for arec in agents:
            key = (arec.session_id, arec.agent_id)
            spent = (agent_spend or {}).get(key, _ZERO)
            self._agents[key] = self._restored(_Scope(AGENT, arec, *key), spent)
        current = self._global.record
        assert isinstance(current, GlobalBudgetRecord)
        if global_record is not None and global_record.configured == current.configured:
            current.budget_usd = global_record.budget_usd
        self._global = self._restored(_Scope(GLOBAL, current), global_spend)

    def _restored(self, sc: _Scope, spent: Decimal) -> _Scope:
        sc.spent = spent
        sc.warned = set(self._crossed(sc))
        self._arm(sc)
        rec, budget = sc.record, sc.record.budget_usd
        if sc.kind != SESSION and budget is not None and spent >= budget:
            rec.paused, rec.pause_reason = True, BUDGET  # derived: only sessions store pauses
        return sc

    # -- scopes ----------------------------------------------------------------------------

    def _session(self, session_id: str, change: Change) -> _Scope:
        sc = self._sessions.get(session_id)
        if sc is None:
            rec = SessionRecord(session_id, time.time(), budget_usd=self._default_budget)
            sc = self._sessions[session_id] = _Scope(SESSION, rec, session_id)
            self._arm(sc)
            change.saved(rec)
        return sc

    def _agent(self, session_id: str, agent_id: str) -> _Scope:
        key = (session_id, agent_id)
        sc = self._agents.get(key)
        if sc is None:  # tracked from the first request, persisted once it has a budget
            rec = AgentBudgetRecord(session_id, agent_id)
            sc = self._agents[key] = _Scope(AGENT, rec, session_id, agent_id, seeded=False)
        return sc

    def _scopes(self, session_id: str, agent_id: str | None, change: Change) -> tuple[_Scope, ...]:
        session = self._session(session_id, change)
        if agent_id is None:
            return session, self._global
        return session, self._agent(session_id, agent_id), self._global

    async def budgeted(self, session_id: str, agent_id: str | None) -> str | None:
        """The first scope of such a request that has a budget (None: none has, and it
        reserves nothing)."""
        sc = self._sessions.get(session_id)
        if sc is None:
            if self._default_budget is not None:
                return SESSION
        elif sc.record.budget_usd is not None:
            return SESSION
        if agent_id is not None:
            agent = self._agents.get((session_id, agent_id))
            if agent is not None and agent.record.budget_usd is not None:
                return AGENT
        return GLOBAL if self._global.record.budget_usd is not None else None

    # -- thresholds ------------------------------------------------------------------------

    def _crossed(self, sc: _Scope) -> list[float]:
        budget = sc.record.budget_usd
        if budget is None:
            return []
        if budget <= 0:
            return list(self._thresholds)
        return [t for t, d in self._fractions if sc.spent >= budget * d]  # exact, no division

    def _arm(self, sc: _Scope) -> None:
        """Where the next warning fires, so settling need not divide on every request."""
        budget = sc.record.budget_usd
        pending = [d for t, d in self._fractions if t not in sc.warned]
        if budget is None or not pending:
            sc.next_warning_at = None
        else:
            sc.next_warning_at = budget * min(pending) if budget > 0 else _ZERO

    def _event(self, type_: str, sc: _Scope, **extra: object) -> Event:
        b = sc.record.budget_usd
        period = None
        if sc.kind == GLOBAL:
            period = self._period.label if self._period is not None else TOTAL
        else:
            session = self._sessions.get(sc.session_id) if sc.session_id is not None else None
            rec = session.record if session is not None else None
            extra["sessionLabel"] = rec.label if isinstance(rec, SessionRecord) else None
        return budget_event(
            type_,
            sc.kind,
            sc.session_id,
            None if b is None else float(b),
            float(sc.spent),
            agent_id=sc.agent_id,
            period=period,
            **extra,
        )

    def _pause(self, sc: _Scope, reason: str, change: Change) -> None:
        sc.record.paused, sc.record.pause_reason = True, reason
        change.saved(sc.record)
        change.events.append(self._event(BUDGET_PAUSED, sc, reason=reason))

    def _unpause(self, sc: _Scope, why: str, change: Change) -> None:
        sc.record.paused, sc.record.pause_reason = False, None
        change.saved(sc.record)
        change.events.append(self._event(BUDGET_RESUMED, sc, reason=why))

    def _spent_changed(self, sc: _Scope, change: Change) -> None:
        if sc.next_warning_at is not None and sc.spent >= sc.next_warning_at:
            for t in self._crossed(sc):
                if t not in sc.warned:
                    sc.warned.add(t)
                    change.events.append(self._event(BUDGET_WARNING, sc, threshold=t))
            self._arm(sc)
        budget = sc.record.budget_usd
        if budget is not None and sc.spent >= budget and not sc.record.paused:
            self._pause(sc, BUDGET, change)

    # -- the global period -----------------------------------------------------------------

    def _roll(self, change: Change) -> None:
        """A new calendar period: its spend starts from zero and a budget pause lifts."""
        period = self._period
        if period is None:
            return
        now = self._clock()
        if now < period.end:
            return
        self._period = period_at(self._period_kind, self._timezone, now)
        sc = self._global
        sc.spent = _ZERO
        sc.warned.clear()
        self._arm(sc)
        if sc.record.paused and sc.record.pause_reason == BUDGET:
            self._unpause(sc, "period ended", change)
        if self._waiters:
            self._drain()

    # -- admission -------------------------------------------------------------------------

    def _check(
        self, scopes: tuple[_Scope, ...], amount: Decimal, behind: Collection[_Scope] = ()
    ) -> tuple[_Scope, str] | None:
        """None if ``scopes`` admit a request reserving ``amount`` now, else the scope that
        doesn't and why: its pause reason, ``budget`` (spent), or ``held`` (its headroom
        is held by in-flight reservations, or others wait for it first: ``behind``).
        A request alone in its scope is admitted whatever it reserves, or a worst case
        larger than the budget would never run."""
        for sc in scopes:
            rec = sc.record
            if rec.paused:
                return sc, rec.pause_reason or MANUAL
            budget = rec.budget_usd
            if budget is not None and sc.spent >= budget:
                return sc, BUDGET
        for sc in scopes:
            if sc in behind:
                return sc, _HELD  # no overtaking those who wait
            budget = sc.record.budget_usd
            if (
                budget is not None
                and sc.in_flight
                and sc.spent + sc.reserved_total + amount > budget
            ):
                return sc, _HELD
        return None

    def _reserve(
        self, scopes: tuple[_Scope, ...], session_id: str, agent_id: str | None, amount: Decimal
    ) -> Reservation:
        for sc in scopes:
            sc.reserved_total += amount
            sc.in_flight += 1
        return Reservation(
            f"{self._id_prefix}{next(self._ids)}", session_id, agent_id, amount, scopes
        )

    async def admit(
        self, session_id: str, agent_id: str | None, reserve: Decimal, wait: float = 0.0
    ) -> tuple[Reservation | Refusal, Change]:
        change = Change()
        if self._period is not None:
            self._roll(change)
        scopes = self._scopes(session_id, agent_id, change)
        behind = {w.held_on for w in self._waiters} if self._waiters else ()
        found = self._check(scopes, reserve, behind)
        if found is None:
            return self._reserve(scopes, session_id, agent_id, reserve), change
        sc, why = found
        if why != _HELD or wait <= 0:
            return self._refusal(sc, why, session_id, reserve), change
        waiter = _Waiter(scopes, session_id, agent_id, reserve, sc, self._loop().create_future())
        return await self._wait(waiter, wait), change

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def _wait(self, waiter: _Waiter, wait: float) -> Reservation | Refusal:
        self._waiters.append(waiter)
        timer = self._loop().call_later(wait, self._expire, waiter)
        fut = waiter.future
        try:
            return await fut
        except asyncio.CancelledError:  # the client left while waiting
            if fut.done() and not fut.cancelled():
                got = fut.result()
                if isinstance(got, Reservation):
                    self.release(got)  # admitted just as it left
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        """The wait ran out: a 429 naming the headroom it waited for. (Had there been
        room, or had its scope been spent, :meth:`_drain` would have answered already.)"""
        w = waiter
        if not w.future.done():
            self._waiters.remove(w)
            w.future.set_result(self._refusal(w.held_on, _HELD, w.session_id, w.reserve))

    def _drain(self) -> None:
        """Admit waiters in arrival order while there is headroom; each one admitted
        reserves before the next is checked, and one still waiting holds its scope for
        itself. A waiter whose scope is now spent gets its 402 at once."""
        keep: deque[_Waiter] = deque()
        held: set[_Scope] = set()
        for w in self._waiters:
            if w.future.done():
                continue
            found = self._check(w.scopes, w.reserve, held)
            if found is None:
                w.future.set_result(self._reserve(w.scopes, w.session_id, w.agent_id, w.reserve))
            elif found[1] == _HELD:
                w.held_on = found[0]
                held.add(found[0])
                keep.append(w)
            else:
                w.future.set_result(self._refusal(found[0], found[1], w.session_id, w.reserve))
        self._waiters = keep

    def _refusal(self, sc: _Scope, why: str, session_id: str, amount: Decimal) -> Refusal:
        if why == _HELD:
            status, code, text = 429, "budget_reserved", self._held_message(sc, amount)
        else:
            status, code, text = 402, f"{sc.kind}_budget_exceeded", self._paused_message(sc, why)
        return Refusal(status, code, sc.kind, session_id, sc.record.budget_usd, sc.spent, text)

    def _name(self, sc: _Scope) -> str:
        return scope_name(sc.kind, sc.session_id, sc.agent_id, self._period)

    def _held_message(self, sc: _Scope, amount: Decimal) -> str:
        budget = sc.record.budget_usd
        assert budget is not None
        return held_message(
            sc.in_flight, sc.reserved_total, budget, sc.spent, self._name(sc), amount
        )

    def _paused_message(self, sc: _Scope, why: str) -> str:
        return paused_message(
            sc.kind, sc.session_id, sc.agent_id, sc.record.budget_usd, sc.spent, why, self._period
        )

    # -- settling --------------------------------------------------------------------------

    def release(self, reservation: Reservation) -> None:
        """Give the headroom back without spending (a request that never ran)."""
        if not reservation.open:
            return
        reservation.open = False
        for sc in reservation._scopes:
            self._unreserve(sc, reservation.amount)
        if self._waiters:
            self._drain()

    @staticmethod
    def _unreserve(sc: _Scope, amount: Decimal) -> None:
        sc.in_flight -= 1
        # Exactly zero when nothing is in flight, so rounding can never accumulate.
        sc.reserved_total = sc.reserved_total - amount if sc.in_flight else _ZERO

    async def settle(self, reservation: Reservation, cost: Decimal | None) -> Change:
        change = Change()
        if not reservation.open:
            return change
        reservation.open = False
        if self._period is not None:
            self._roll(change)
        for sc in reservation._scopes:
            self._unreserve(sc, reservation.amount)
            if cost:
                sc.spent += cost
                self._spent_changed(sc, change)
        change.spent = reservation._scopes[0].spent  # the session's scope comes first
        if self._waiters:
            self._drain()
        return change

    # -- budgets, pauses -------------------------------------------------------------------

    def _set(self, sc: _Scope, budget: Decimal | None, change: Change) -> None:
        sc.record.budget_usd = budget
        change.saved(sc.record)
        sc.warned &= set(self._crossed(sc))  # re-arm the thresholds now below the spend
        self._arm(sc)
        over = budget is not None and sc.spent >= budget
        if sc.record.paused and sc.record.pause_reason == BUDGET and not over:
            self._unpause(sc, "budget raised", change)
        elif over and not sc.record.paused:  # lowered below what is already spent
            self._pause(sc, BUDGET, change)
        if self._waiters:
            self._drain()

    async def set_budget(self, session_id: str, budget: Decimal | None) -> Change:
        change = Change()
        self._set(self._session(session_id, change), budget, change)
        return change

    @property
    def loaded_at(self) -> float:
        """When the spend on record was loaded: messages started before this are not in
        the spend of an agent first seen since (:meth:`seed_agent`)."""
        return self._loaded_at

    async def unseeded_agent(self, session_id: str, agent_id: str) -> bool:
        """Is this agent's spend before :attr:`loaded_at` missing? (Only agents with a
        budget are loaded at start-up; the caller seeds one before budgeting it.)"""
        sc = self._agents.get((session_id, agent_id))
        return sc is None or not sc.seeded

    async def seed_agent(self, session_id: str, agent_id: str, before: Decimal) -> None:
        """Add what the agent spent before :attr:`loaded_at`, once."""
        sc = self._agent(session_id, agent_id)
        if not sc.seeded:
            sc.seeded = True
            sc.spent += before

    async def set_agent_budget(
        self, session_id: str, agent_id: str, budget: Decimal | None
    ) -> Change:
        change = Change()
        self._session(session_id, change)
        self._set(self._agent(session_id, agent_id), budget, change)
        return change

    async def set_global_budget(self, budget: Decimal | None) -> Change:
        change = Change()
        self._roll(change)
        self._set(self._global, budget, change)
        return change

    async def set_label(self, session_id: str, label: str | None) -> Change:
        """Set (None: clear) the session's label; nothing changes when it has it already."""
        change = Change()
        rec = self._session(session_id, change).record
        assert isinstance(rec, SessionRecord)
        if rec.label != label:
            rec.label = label
            change.saved(rec)
            change.events.append(session_label_event(session_id, label))
        return change

    async def busy_sessions(self) -> set[str]:
        busy = {sid for sid, sc in self._sessions.items() if sc.in_flight}
        busy.update(w.session_id for w in self._waiters)
        return busy

    async def forget(self, session_ids: Collection[str], global_spend: Decimal) -> Change:
        """Sessions removed from the store (docs/reference.md §5 "Removing old
        sessions"): their scopes and agents go, and the global spend loses
        ``global_spend``, what their rows cost in its current period, so it is what a
        restart would load from the rows left; a budget pause it no longer earns lifts."""
        change = Change()
        gone = set(session_ids)
        for sid in gone:
            self._sessions.pop(sid, None)
        for key in [k for k in self._agents if k[0] in gone]:
            del self._agents[key]
        sc = self._global
        if global_spend:
            sc.spent = max(_ZERO, sc.spent - global_spend)
            sc.warned &= set(self._crossed(sc))
            self._arm(sc)
            budget = sc.record.budget_usd
            over = budget is not None and sc.spent >= budget
            if sc.record.paused and sc.record.pause_reason == BUDGET and not over:
                self._unpause(sc, "sessions removed", change)
            if self._waiters:
                self._drain()
        return change

    async def pause(self, session_id: str, reason: str = MANUAL) -> Change:
        change = Change()
        sc = self._session(session_id, change)
        if not sc.record.paused:
            self._pause(sc, reason, change)
        return change

    async def resume(self, session_id: str) -> Change:
        """Lift a pause; refused (:class:`ResumeRefused`) while spend is at or over the
        budget, since the next request would only run past it."""
        change = Change()
        sc = self._session(session_id, change)
        budget = sc.record.budget_usd
        if budget is not None and sc.spent >= budget:
            raise ResumeRefused(resume_refused_message(session_id, sc.spent, budget))
        if sc.record.paused:
            self._unpause(sc, "resumed", change)
            if self._waiters:
                self._drain()
        return change

    # -- reads -----------------------------------------------------------------------------

    def spent(self, session_id: str) -> Decimal:
        sc = self._sessions.get(session_id)
        return sc.spent if sc else _ZERO

    cached_spent = spent
    """Always current here: this process holds the only copy."""

    async def spent_of(self, session_ids: Collection[str]) -> dict[str, Decimal]:
        return {sid: self.spent(sid) for sid in session_ids}

    async def snapshot(self, session_id: str) -> SessionView | None:
        sc = self._sessions.get(session_id)
        if sc is None:
            return None
        assert isinstance(sc.record, SessionRecord)
        return SessionView(sc.record, sc.spent, self._pressure(sc))

    def session(self, session_id: str) -> SessionRecord | None:
        sc = self._sessions.get(session_id)
        return sc.record if sc else None  # type: ignore[return-value]

    async def agent_budgets(self, session_id: str) -> list[tuple[AgentBudgetRecord, Decimal]]:
        """``(record, spent)`` of the session's agents that have a budget."""
        out = []
        for (sid, _), sc in self._agents.items():
            if sid == session_id and sc.record.budget_usd is not None:
                assert isinstance(sc.record, AgentBudgetRecord)
                out.append((sc.record, sc.spent))
        return out

    async def global_budget(self) -> tuple[GlobalBudgetRecord, Decimal, Period | None, Change]:
        """The global budget, its spend in the current period and the period (rolled
        over first if it ended: the change says so)."""
        change = Change()
        self._roll(change)
        rec = self._global.record
        assert isinstance(rec, GlobalBudgetRecord)
        return rec, self._global.spent, self._period, change

    def live_remaining(self, reservation: Reservation) -> Headroom | None:
        """The least that any budgeted scope of this request has left (budget less spent;
        reservations are not subtracted, so a running stream's own does not count
        against it); None if no scope has a budget."""
        least: Headroom | None = None
        for sc in reservation._scopes:
            budget = sc.record.budget_usd
            if budget is not None and (least is None or budget - sc.spent < least.left):
                least = Headroom(budget - sc.spent, sc.kind, self._name(sc))
        return least

    async def pressure(self, session_id: str | None, agent_id: str | None = None) -> Pressure:
        """In flight, reserved and waiting in a session's scope, an agent's (with
        ``agent_id``) or the global one (``session_id`` None)."""
        if session_id is None:
            sc: _Scope | None = self._global
        elif agent_id is None:
            sc = self._sessions.get(session_id)
        else:
            sc = self._agents.get((session_id, agent_id))
        return Pressure(0, _ZERO, 0) if sc is None else self._pressure(sc)

    def _pressure(self, sc: _Scope) -> Pressure:
        waiting = sum(1 for w in self._waiters if w.held_on is sc)
        return Pressure(sc.in_flight, sc.reserved_total, waiting)

    @property
    def paused_count(self) -> int:
        return sum(1 for sc in self._sessions.values() if sc.record.paused)

    def budgets(self) -> list[tuple[str, Decimal, Decimal]]:
        """``(session, budget, spent)`` of every session that has a budget (for metrics)."""
        out = []
        for sid, sc in self._sessions.items():
            if sc.record.budget_usd is not None:
                out.append((sid, sc.record.budget_usd, sc.spent))
        return out
