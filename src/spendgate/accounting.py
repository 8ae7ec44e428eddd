"""From a finished (or running) exchange to money: price → ledger → store → events → metrics.

The proxy calls this and nothing else for bookkeeping. Each step after the ledger is
guarded: a failing subscriber, metric or queue can never break a client's response.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from decimal import Decimal
from typing import Any

from spendgate.budgets import BudgetLedger, Change, Refusal, Reservation
from spendgate.bus import EventBus
from spendgate.events import CONTEXT_USAGE, TOKEN_USAGE, Event, context_data
from spendgate.metrics import Metrics
from spendgate.pricing import ModelPrice, PriceTable
from spendgate.providers._api import RequestInfo, ResponseParser
from spendgate.records import MessageRecord
from spendgate.routing import Target
from spendgate.store import Store
from spendgate.usage import TokenCounts, estimate_tokens

log = logging.getLogger("spendgate.accounting")

# Message ids: a random per-process prefix and a counter (unique across restarts and
# replicas, and no system call per request as uuid4 makes).
_ID_PREFIX = os.urandom(8).hex()
_ID_SEQ = itertools.count()
_ZERO = Decimal(0)


def apply_change(change: Change, store: Store, bus: EventBus) -> None:
    """Persist and publish what a ledger call changed (the ledger only returns it)."""
    if change.session is not None:
        store.save_session(change.session)
    for ev in change.events:
        try:
            bus.publish(ev)
        except Exception:
            log.exception("event bus failed to publish %s", ev.type)


class Exchange:
    """One request's bookkeeping state, from admission to its row.

    A plain class rather than a dataclass: one is built per request, and a generated
    ``__init__`` with default factories costs several times this one.
    """

    __slots__ = (
        "aborted", "error", "id", "info", "key_fingerprint", "last_live", "parser", "price",
        "priced_model", "reservation", "started_at", "status", "t0", "target", "ttft",
    )  # fmt: skip

    def __init__(
        self, target: Target, info: RequestInfo, key_fingerprint: str | None = None
    ) -> None:
        self.target = target
        self.info = info
        self.key_fingerprint = key_fingerprint
        self.id = f"msg_{_ID_PREFIX}{next(_ID_SEQ):010x}"
        self.parser: ResponseParser | None = None
        self.reservation: Reservation | None = None
        self.started_at = time.time()
        self.t0 = self.last_live = time.perf_counter()
        """``last_live``: when the last live update went out (the first waits one interval)."""
        self.ttft: float | None = None
        self.status = 0
        self.aborted = False
        self.error: str | None = None
        self.price: ModelPrice | None = None
        self.priced_model: str | None = None
        """The model ``price`` was looked up for (the response may name another)."""

    @property
    def model(self) -> str | None:
        return (self.parser.model if self.parser else None) or self.info.model

    def estimated_counts(self) -> TokenCounts:
        """Estimates from the request size and the deltas streamed so far."""
        reported = self.parser.usage if self.parser else None
        out = estimate_tokens(self.parser.output_chars) if self.parser else 0
        if reported is not None:
            return TokenCounts(
                input_tokens=reported.input_tokens or estimate_tokens(self.info.input_chars),
                output_tokens=max(reported.output_tokens or 0, out),
                cached_input_tokens=reported.cached_input_tokens or 0,
                cache_write_tokens=reported.cache_write_tokens or 0,
                cache_write_1h_tokens=reported.cache_write_1h_tokens or 0,
                reasoning_tokens=reported.reasoning_tokens or 0,
            )
        return TokenCounts(input_tokens=estimate_tokens(self.info.input_chars), output_tokens=out)

    def final_counts(self) -> tuple[TokenCounts, bool]:
        """The numbers to bill, and whether they are estimates."""
        reported = self.parser.usage if self.parser else None
        if not self.info.metered or self.info.operation == "other" or self.status == 0:
            return TokenCounts(), False
        if self.status >= 400:
            return (reported.counts() if reported else TokenCounts()), False
        complete = not self.aborted and self.error is None
        if (
            reported is not None
            and complete
            and reported.input_tokens is not None
            and reported.output_tokens is not None
        ):
            return reported.counts(), False
        return self.estimated_counts(), True


class Accountant:
    def __init__(
        self,
        prices: PriceTable,
        ledger: BudgetLedger,
        store: Store,
        bus: EventBus,
        metrics: Metrics,
        live_interval_ms: int = 250,
        reserve_output_tokens: int | None = None,
    ) -> None:
        self.prices = prices
        self.ledger = ledger
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self._live_interval = live_interval_ms / 1000
        self._reserve_output = reserve_output_tokens

    # -- sessions and budgets --------------------------------------------------------------

    def apply(self, change: Change) -> None:
        apply_change(change, self.store, self.bus)

    def _publish(self, ev: Event) -> None:
        try:
            self.bus.publish(ev)
        except Exception:
            log.exception("event bus failed to publish %s", ev.type)

    def _price(self, ex: Exchange, model: str) -> ModelPrice | None:
        """The price of ``model``, looked up once per exchange (and again only if the
        response names a different model than the request)."""
        if model != ex.priced_model:
            ex.price = self.prices.priced(model, ex.target.route.provider)
            ex.priced_model = model
        return ex.price

    def reserve_cost(self, ex: Exchange) -> Decimal:
        info = ex.info
        if not info.metered or info.model is None:
            return _ZERO
        price = self._price(ex, info.model)
        if price is None:
            return _ZERO
        out = info.max_output_tokens or self._reserve_output
        if out is None:
            out = min(4096, price.max_output_tokens or 4096)
        return price.reserve_cost(estimate_tokens(info.input_chars), out) or _ZERO

    async def admit(self, ex: Exchange) -> Refusal | None:
        outcome, change = await self.ledger.admit(ex.target.session_id, self.reserve_cost(ex))
        self.apply(change)
        if isinstance(outcome, Refusal):
            return outcome
        ex.reservation = outcome
        return None

    def _cost(self, ex: Exchange, model: str | None, counts: TokenCounts) -> Decimal | None:
        price = self._price(ex, model) if model else None
        return None if price is None else price.cost(counts)

    # -- while streaming ---------------------------------------------------------------------

    def live(self, ex: Exchange) -> None:
        """A throttled ``final: false`` update, only built when somebody listens."""
        if not self.bus.subscriber_count:
            return
        now = time.perf_counter()
        if now - ex.last_live < self._live_interval:
            return
        ex.last_live = now
        counts = ex.estimated_counts()
        cost = self._cost(ex, ex.model, counts)
        spent = self.ledger.spent(ex.target.session_id)
        self._publish(self._usage_event(ex, counts, cost, spent + (cost or 0), False, True))

    def over_budget(self, ex: Exchange) -> bool:
        """Has the live estimate of this stream used up the session's remaining budget?"""
        remaining = self.ledger.live_remaining(ex.target.session_id)
        if remaining is None:
            return False
        cost = self._cost(ex, ex.model, ex.estimated_counts())
        return cost is not None and cost >= remaining

    # -- at the end ------------------------------------------------------------------------------

    async def finish(self, ex: Exchange) -> MessageRecord:
        counts, estimated = ex.final_counts()
        model, provider = ex.model, ex.target.route.provider
        cost = self._cost(ex, model, counts)
        if cost is None and counts.total_tokens == 0 and ex.status >= 400:
            cost = Decimal(0)  # an error that billed nothing costs nothing, known or not
        if ex.reservation is not None:
            try:
                self.apply(await self.ledger.settle(ex.reservation, cost))
            except Exception:
                log.exception("budget ledger failed to settle %s", ex.id)
        rec = MessageRecord(
            id=ex.id,
            session_id=ex.target.session_id,
            agent_id=ex.target.agent_id,
            route=ex.target.route.name,
            provider=provider,
            model=model,
            endpoint=ex.info.operation or "other",
            status=ex.status,
            stream=ex.info.stream,
            input_tokens=counts.input_tokens,
            output_tokens=counts.output_tokens,
            cached_input_tokens=counts.cached_input_tokens,
            cache_write_tokens=counts.cache_write_tokens,
            reasoning_tokens=counts.reasoning_tokens,
            cost_usd=cost,
            estimated=estimated,
            aborted=ex.aborted,
            started_at=ex.started_at,
            ttft_ms=None if ex.ttft is None else round(ex.ttft * 1000, 3),
            duration_ms=round((time.perf_counter() - ex.t0) * 1000, 3),
            key_fingerprint=ex.key_fingerprint,
            error=ex.error,
        )
        self.store.add_message(rec)
        spent = self.ledger.spent(ex.target.session_id)
        self._publish(self._usage_event(ex, counts, cost, spent, True, estimated))
        if ex.status < 400 and counts.total_tokens:
            price = self.prices.resolve(model, provider) if model else None  # priced or not
            window = price.context_window if price else None
            make = functools.partial(
                context_data, rec.session_id, model, counts.total_tokens, window
            )
            self._publish(Event(CONTEXT_USAGE, rec.session_id, make=make))
        try:
            self.metrics.record(rec, ex.info.operation or "other", ex.info.model)
        except Exception:
            log.exception("metrics failed for %s", ex.id)
        return rec

    def _usage_event(
        self,
        ex: Exchange,
        counts: TokenCounts,
        cost: Decimal | None,
        session_cost: Decimal,
        final: bool,
        estimated: bool,
    ) -> Event:
        sid, target = ex.target.session_id, ex.target
        make = functools.partial(
            usage_data, ex.id, sid, target.agent_id, target.route.provider, ex.model,
            counts, cost, session_cost, final, estimated, time.time(),
        )  # fmt: skip
        return Event(TOKEN_USAGE, sid, make=make)


def usage_data(
    message_id: str,
    session_id: str,
    agent_id: str | None,
    provider: str,
    model: str | None,
    counts: TokenCounts,
    cost: Decimal | None,
    session_cost: Decimal,
    final: bool,
    estimated: bool,
    timestamp: float,
) -> dict[str, Any]:
    """A ``token.usage`` payload (SPEC 6), from the values at the time of the event."""
    return {
        "messageId": message_id,
        "sessionId": session_id,
        "agentId": agent_id,
        "inputTokens": counts.input_tokens,
        "outputTokens": counts.output_tokens,
        "cachedInputTokens": counts.cached_input_tokens,
        "cacheWriteTokens": counts.cache_write_tokens,
        "reasoningTokens": counts.reasoning_tokens,
        "totalTokens": counts.total_tokens,
        "costUsd": None if cost is None else float(cost),
        "sessionCostUsd": float(session_cost),
        "modelId": model,
        "providerId": provider,
        "final": final,
        "estimated": estimated,
        "timestamp": timestamp,
    }
