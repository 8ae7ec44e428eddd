"""The budget ledger seam: admit / reserve / settle per session (docs/reference.md §6).
No HTTP, no SQL.

Admission and reservation happen in one step with no await in between, so a burst of
concurrent requests cannot all see the same spare budget. Every change is returned as
events plus the session's new record; the caller publishes and persists them.
A Redis ledger (atomic counters) implements the same protocol for several replicas.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from spendgate.events import BUDGET_PAUSED, BUDGET_RESUMED, BUDGET_WARNING, Event, budget_event
from spendgate.records import SessionRecord

MANUAL = "manual"
BUDGET = "budget"


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    session_id: str
    amount: Decimal


def usd(amount: Decimal) -> str:
    """Dollars for people: cents when that is exact enough, else up to six decimals.

    The exact amount of a ``Decimal``, for messages (the 402 refusal says "spent $0.0004");
    tables of floats use :func:`spendgate.render.usd`, which pads to a fixed precision.
    """
    if amount == amount.quantize(Decimal("0.01")):
        return f"${amount:,.2f}"
    return "$" + format(amount.quantize(Decimal("0.000001")).normalize(), "f")


@dataclass(frozen=True, slots=True)
class Refusal:
    session_id: str
    budget_usd: Decimal | None
    spent_usd: Decimal
    reason: str

    def message(self) -> str:
        sid = self.session_id
        budget = "no budget" if self.budget_usd is None else f"a {usd(self.budget_usd)} budget"
        why = "was paused by hand" if self.reason == MANUAL else "has used up its budget"
        return (
            f"spendgate paused session '{sid}': it {why} (spent {usd(self.spent_usd)} of "
            f"{budget}). To continue, raise the budget (PUT /api/sessions/{sid}/budget or "
            f"`spendgate budget {sid} USD`) or resume it (POST /api/sessions/{sid}/resume or "
            f"`spendgate resume {sid}`)."
        )


@dataclass(slots=True)
class Change:
    """What a ledger operation changed: the session's record if it did, and events."""

    session: SessionRecord | None = None
    events: list[Event] = field(default_factory=list)


class BudgetLedger(Protocol):
    async def admit(
        self, session_id: str, reserve: Decimal
    ) -> tuple[Reservation | Refusal, Change]: ...

    async def settle(self, reservation: Reservation, cost: Decimal | None) -> Change: ...

    async def set_budget(self, session_id: str, budget: Decimal | None) -> Change: ...

    async def pause(self, session_id: str, reason: str = MANUAL) -> Change: ...

    async def resume(self, session_id: str) -> Change: ...

    def spent(self, session_id: str) -> Decimal: ...

    def session(self, session_id: str) -> SessionRecord | None: ...

    def live_remaining(self, session_id: str) -> Decimal | None: ...

    @property
    def paused_count(self) -> int: ...


@dataclass(slots=True)
class _State:
    record: SessionRecord
    spent: Decimal = Decimal(0)
    reserved: dict[int, Decimal] = field(default_factory=dict)
    reserved_total: Decimal = Decimal(0)
    """The sum of ``reserved``, kept as it changes (admission reads it every request)."""
    warned: set[float] = field(default_factory=set)
    next_warning_at: Decimal | None = None
    """Spend at which the lowest threshold not yet warned about is crossed (None: none)."""
    override: bool = False
    """Resumed by hand while over budget: admit until the next settled request."""


class MemoryLedger:
    def __init__(self, thresholds: list[float], default_budget: Decimal | None) -> None:
        self._thresholds = sorted(thresholds)
        self._fractions = [(t, Decimal(repr(t))) for t in self._thresholds]
        self._default_budget = default_budget
        self._sessions: dict[str, _State] = {}
        self._ids = itertools.count(1)

    def load(self, sessions: list[SessionRecord], spend: dict[str, Decimal]) -> None:
        """Restore state after a restart: totals and pauses survive, warnings don't refire."""
        for rec in sessions:
            st = _State(rec, spend.get(rec.id, Decimal(0)))
            st.warned = set(self._crossed(st))
            self._arm(st)
            self._sessions[rec.id] = st

    def _state(self, session_id: str, change: Change) -> _State:
        st = self._sessions.get(session_id)
        if st is None:
            rec = SessionRecord(session_id, time.time(), budget_usd=self._default_budget)
            st = self._sessions[session_id] = _State(rec)
            self._arm(st)
            change.session = rec
        return st

    def _crossed(self, st: _State) -> list[float]:
        budget = st.record.budget_usd
        if budget is None:
            return []
        if budget <= 0:
            return list(self._thresholds)
        return [t for t, d in self._fractions if st.spent >= budget * d]  # exact, no division

    def _arm(self, st: _State) -> None:
        """Where the next warning fires, so settling need not divide on every request."""
        budget = st.record.budget_usd
        pending = [d for t, d in self._fractions if t not in st.warned]
        if budget is None or not pending:
            st.next_warning_at = None
        else:
            st.next_warning_at = budget * min(pending) if budget > 0 else Decimal(0)

    def _event(self, type_: str, st: _State, **extra: object) -> Event:
        b = st.record.budget_usd
        return budget_event(
            type_, st.record.id, None if b is None else float(b), float(st.spent), **extra
        )

    async def admit(
        self, session_id: str, reserve: Decimal
    ) -> tuple[Reservation | Refusal, Change]:
        change = Change()
        st = self._state(session_id, change)
        rec = st.record
        if rec.paused:
            return Refusal(session_id, rec.budget_usd, st.spent, rec.pause_reason or MANUAL), change
        if (
            rec.budget_usd is not None
            and not st.override
            and st.spent + st.reserved_total >= rec.budget_usd
        ):
            return Refusal(session_id, rec.budget_usd, st.spent, BUDGET), change
        res = Reservation(next(self._ids), session_id, reserve)
        st.reserved[res.id] = reserve
        st.reserved_total += reserve
        return res, change

    async def settle(self, reservation: Reservation, cost: Decimal | None) -> Change:
        change = Change()
        st = self._state(reservation.session_id, change)
        held = st.reserved.pop(reservation.id, None)
        if held is not None:
            st.reserved_total -= held
        if cost:
            st.spent += cost
        st.override = False
        if st.next_warning_at is not None and st.spent >= st.next_warning_at:
            for t in self._crossed(st):
                if t not in st.warned:
                    st.warned.add(t)
                    change.events.append(self._event(BUDGET_WARNING, st, threshold=t))
            self._arm(st)
        budget = st.record.budget_usd
        if budget is not None and st.spent >= budget and not st.record.paused:
            st.record.paused, st.record.pause_reason = True, BUDGET
            change.session = st.record
            change.events.append(self._event(BUDGET_PAUSED, st, reason=BUDGET))
        return change

    async def set_budget(self, session_id: str, budget: Decimal | None) -> Change:
        change = Change()
        st = self._state(session_id, change)
        st.record.budget_usd = budget
        change.session = st.record
        st.warned &= set(self._crossed(st))  # re-arm the thresholds now below the spend
        self._arm(st)
        over = budget is not None and st.spent >= budget
        if st.record.paused and st.record.pause_reason == BUDGET and not over:
            st.record.paused, st.record.pause_reason = False, None
            change.events.append(self._event(BUDGET_RESUMED, st, reason="budget raised"))
        elif over and not st.record.paused:  # lowered below what is already spent
            st.record.paused, st.record.pause_reason = True, BUDGET
            change.events.append(self._event(BUDGET_PAUSED, st, reason=BUDGET))
        return change

    async def pause(self, session_id: str, reason: str = MANUAL) -> Change:
        change = Change()
        st = self._state(session_id, change)
        if not st.record.paused:
            st.record.paused, st.record.pause_reason = True, reason
            change.session = st.record
            change.events.append(self._event(BUDGET_PAUSED, st, reason=reason))
        return change

    async def resume(self, session_id: str) -> Change:
        change = Change()
        st = self._state(session_id, change)
        if st.record.paused:
            st.record.paused, st.record.pause_reason = False, None
            budget = st.record.budget_usd
            st.override = budget is not None and st.spent >= budget
            change.session = st.record
            change.events.append(self._event(BUDGET_RESUMED, st, reason="resumed"))
        return change

    def spent(self, session_id: str) -> Decimal:
        st = self._sessions.get(session_id)
        return st.spent if st else Decimal(0)

    def session(self, session_id: str) -> SessionRecord | None:
        st = self._sessions.get(session_id)
        return st.record if st else None

    def live_remaining(self, session_id: str) -> Decimal | None:
        """The budget less what is spent (None: unlimited). Reservations are not subtracted,
        so a running stream's own reservation does not count against it."""
        st = self._sessions.get(session_id)
        if st is None or st.record.budget_usd is None:
            return None
        return st.record.budget_usd - st.spent

    @property
    def paused_count(self) -> int:
        return sum(1 for st in self._sessions.values() if st.record.paused)

    def budgets(self) -> list[tuple[str, Decimal, Decimal]]:
        """``(session, budget, spent)`` of every session that has a budget (for metrics)."""
        out = []
        for sid, st in self._sessions.items():
            if st.record.budget_usd is not None:
                out.append((sid, st.record.budget_usd, st.spent))
        return out
