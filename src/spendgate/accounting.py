"""From a request's meter to money: price → ledger → store → events → metrics
(docs/reference.md §13).

The :class:`Accountant` holds the parts every request shares; each request's
:class:`~spendgate.meter.Meter` calls back here for admission, live updates, the budget
cut and the bookkeeping at the end. The proxy hands it to each meter and calls nothing
here itself. Each step after the ledger is guarded: a failing subscriber, metric or
queue can never break a client's response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING

from spendgate.budgets import BudgetLedger, Change, Headroom, Refusal
from spendgate.bus import EventBus
from spendgate.events import (
    BUDGET_UNENFORCEABLE,
    CONTEXT_USAGE,
    TOKEN_USAGE,
    Event,
    context_data,
    token_usage_data,
)
from spendgate.metrics import Metrics
from spendgate.pricing import Charge, ModelPrice, PriceTable, charge
from spendgate.records import AgentBudgetRecord, MessageRecord, SessionRecord
from spendgate.settings import SettingsError
from spendgate.store import COST_DIGITS, Store
from spendgate.usage import NO_EXTRAS, TokenCounts, estimate_tokens

if TYPE_CHECKING:
    from spendgate.meter import Meter

log = logging.getLogger("spendgate.accounting")

MAX_UNENFORCEABLE = 10_000
"""(session, model) pairs remembered for the once-only ``budget.unenforceable`` warning;
past this, clients choosing new model names cannot grow the set."""

_ZERO = Decimal(0)
COST_QUANTUM = Decimal(1).scaleb(-COST_DIGITS)
"""A message's cost is rounded to this once (half even), so a shared ledger's integer
spend equals the sum of the rows exactly (docs/reference.md §6 "Several replicas")."""


def apply_change(change: Change, store: Store, bus: EventBus) -> None:
    """Persist and publish what a ledger call changed (the ledger only returns it)."""
    for rec in change.records:
        if isinstance(rec, SessionRecord):
            store.save_session(rec)
        elif isinstance(rec, AgentBudgetRecord):
            store.save_agent_budget(rec)
        else:
            store.save_global_budget(rec)
    for ev in change.events:
        publish(bus, ev)


def publish(bus: EventBus, ev: Event) -> None:
    """Publish, guarded: a failing bus never breaks a response or an API call."""
    try:
        bus.publish(ev)
    except Exception:
        log.exception("event bus failed to publish %s", ev.type)


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
        admission_wait_s: float = 0.0,
        unpriced_models: str = "refuse",
    ) -> None:
        self.prices = prices
        self.ledger = ledger
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self._live_interval = live_interval_ms / 1000
        self._reserve_output = reserve_output_tokens
        self._wait = admission_wait_s
        self._allow_unpriced = unpriced_models == "allow"
        self._settling: set[asyncio.Task[None]] = set()
        """Settles sent as their responses went (a remote ledger), until answered."""
        self._stand_in: str | None = None
        """``price_as:MODEL``: the model whose price stands in for models the table
        lacks, looked up in the current table (a price reload swaps it)."""
        if unpriced_models.startswith("price_as:"):
            self._stand_in = stand_in = unpriced_models.partition(":")[2]
            if prices.priced(stand_in, None) is None:
                raise SettingsError(
                    f"bad setting unpriced_models (SPENDGATE_UNPRICED_MODELS): "
                    f"price_as:{stand_in} names a model with no price"
                )
        self._unenforceable: set[tuple[str, str | None]] = set()
        """(session, model) pairs already warned about under ``allow`` (bounded below)."""

    # -- sessions and budgets --------------------------------------------------------------

    def apply(self, change: Change) -> None:
        apply_change(change, self.store, self.bus)

    def _publish(self, ev: Event) -> None:
        publish(self.bus, ev)

    def _price(self, ex: Meter, model: str) -> ModelPrice | None:
        """The price of ``model``, looked up once per exchange (and again only if the
        response names a different model than the request); ``price_as`` stands in for
        a model the table lacks."""
        if model != ex.priced_model:
            r = ex.target.route
            price = self.prices.priced(model, r.provider, local=r.local)
            if price is None and self._stand_in is not None:
                price = self.prices.priced(self._stand_in, None)
            ex.price, ex.priced_model = price, model
        return ex.price

    def reserve_cost(self, ex: Meter, price: ModelPrice) -> Decimal:
        """The request's worst case: its input estimate, and the largest output it may
        produce (its bound, or the default) for every choice it asks for."""
        info = ex.info
        out = info.max_output_tokens or self._reserve_output
        if info.unread:  # its own bound, if any, could not be read: the model's maximum
            out = price.max_output_tokens or out
        if out is None:
            out = min(4096, price.max_output_tokens or 4096)
        price = price.for_tier(info.service_tier)  # priority costs more than it would
        return price.reserve_cost(estimate_tokens(info.input_chars), out * info.choices) or _ZERO

    async def admit(self, ex: Meter) -> Refusal | None:
        """Reserve the worst case against every budgeted scope, or say why not. A request
        no budget applies to reserves nothing and is never refused for money."""
        target, info = ex.target, ex.info
        if not info.metered:
            return None  # a free call: no budget applies, and it makes no session
        sid, agent = target.session_id, target.agent_id
        if target.label is not None:  # X-Spendgate-Session-Label (docs/reference.md §2)
            self.apply(await self.ledger.set_label(sid, target.label))
        reserve = _ZERO
        scope = await self.ledger.budgeted(sid, agent)
        if scope is not None:
            price = self._price(ex, info.model) if info.model else None
            if price is not None:
                reserve = self.reserve_cost(ex, price)
            elif not self._allow_unpriced:
                return self._refused(ex, self._unpriced(ex, scope))
            else:
                self._unenforced(ex, scope)
        outcome, change = await self.ledger.admit(sid, agent, reserve, self._wait)
        self.apply(change)
        if isinstance(outcome, Refusal):
            return self._refused(ex, outcome)
        ex.reservation = outcome
        return None

    def _refused(self, ex: Meter, refusal: Refusal) -> Refusal:
        self.metrics.budget_rejections.labels(ex.target.route.name, refusal.code).inc()
        return refusal

    def _unpriced(self, ex: Meter, scope: str) -> Refusal:
        model = ex.info.model
        what = f"model '{model}' has no price" if model else "the request names no model"
        sid = ex.target.session_id
        text = (
            f"spendgate refused this request: {what}, so the {scope} budget that applies "
            f"to session '{sid}' cannot be enforced. Add a price to your pricing file "
            "(SPENDGATE_PRICING_FILE), or set SPENDGATE_UNPRICED_MODELS=price_as:MODEL to "
            "price it as a known model, or =allow to forward unpriced models unmetered."
        )
        spent = self.ledger.cached_spent(sid)
        return Refusal(402, "model_unpriced", scope, sid, None, spent, text)

    def _unenforced(self, ex: Meter, scope: str) -> None:
        """``allow``: forward, and say once per session and model that no budget holds it."""
        sid, model = ex.target.session_id, ex.info.model
        key = (sid, model)
        if key in self._unenforceable or len(self._unenforceable) >= MAX_UNENFORCEABLE:
            return
        self._unenforceable.add(key)
        log.warning(
            "session %s: model %s has no price; its %s budget does not limit it "
            "(SPENDGATE_UNPRICED_MODELS=allow)",
            sid, model, scope,
        )  # fmt: skip
        data = {"sessionId": sid, "modelId": model, "scope": scope, "reason": "model_unpriced"}
        self._publish(Event(BUDGET_UNENFORCEABLE, sid, data))

    def _cost(self, ex: Meter, model: str | None, counts: TokenCounts) -> Decimal | None:
        price = self._price(ex, model) if model else None
        return None if price is None else price.cost(counts)

    # -- while streaming ---------------------------------------------------------------------

    def stream_started(self) -> None:
        self.metrics.active_streams += 1

    def stream_ended(self) -> None:
        self.metrics.active_streams -= 1

    def upstream_failed(self, route: str, kind: str) -> None:
        self.metrics.upstream_errors.labels(route, kind).inc()

    def live(self, ex: Meter) -> None:
        """A throttled ``final: false`` update, only built when somebody listens."""
        if not self.bus.listening:
            return
        now = time.perf_counter()
        if now - ex.last_live < self._live_interval:
            return
        ex.last_live = now
        counts = ex.estimated_counts()
        cost = self._cost(ex, ex.model, counts)
        spent = self.ledger.cached_spent(ex.target.session_id)
        self._publish(
            self._usage_event(ex, counts, cost, spent + (cost or 0), final=False, estimated=True)
        )

    def over_budget(self, ex: Meter) -> Headroom | None:
        """Has the live estimate of this stream used up what its tightest budget has
        left? That budget if so, else None."""
        if ex.reservation is None:
            return None
        least = self.ledger.live_remaining(ex.reservation)
        if least is None:
            return None
        cost = self._cost(ex, ex.model, ex.estimated_counts())
        return least if cost is not None and cost >= least.left else None

    # -- at the end ------------------------------------------------------------------------------

    async def finish(self, ex: Meter) -> MessageRecord:
        counts, estimated = ex.final_counts()
        route = ex.target.route
        model, provider = ex.model, route.provider
        price = self._price(ex, model) if model else None
        billed = charge(price, counts, reported_cost=route.reported_cost)
        # ``cost`` (not ``billed.cost``) is what the ledger, the row and the event get, so
        # ``billed`` is never rebuilt (a NamedTuple _replace per row).
        cost = billed.cost
        if cost is None and counts.total_tokens == 0 and ex.status >= 400:
            cost = Decimal(0)  # an error that billed nothing costs nothing, known or not
        elif cost is not None:
            cost = cost.quantize(COST_QUANTUM)  # once: the ledger and the row get this value
        extras = counts.extras or NO_EXTRAS
        spent: Decimal | None = None
        later = ex.reservation is not None and self.ledger.remote
        if ex.reservation is not None and not later:
            spent = await self._settle(ex, cost)
        rec = MessageRecord(
            id=ex.id,
            session_id=ex.target.session_id,
            agent_id=ex.target.agent_id,
            route=ex.target.route.name,
            provider=provider,
            model=model,
            endpoint=ex.info.operation or "other",
            status=ex.status,
            stream=ex.streamed,
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
            note=ex.note(),
            transport=ex.transport,
            service_tier=extras.service_tier,
            input_audio_tokens=extras.input_audio_tokens,
            input_image_tokens=extras.input_image_tokens,
            output_audio_tokens=extras.output_audio_tokens,
            output_image_tokens=extras.output_image_tokens,
            tool_cost_usd=billed.tools,
            table_cost_usd=billed.table,
            priced_as=billed.priced_as,
            price_source=billed.price_source,
        )
        if ex.info.metered:  # a free call (HEAD, model listings, count_tokens) is no message
            self.store.add_message(rec)  # queued and journaled before the response goes
        if later:
            # The ledger's trip is sent now and answered after the response (one trip the
            # client does not wait for): queued before any later request of this client
            # can be read, so that request's admission comes after it in the same batch.
            task = asyncio.ensure_future(self._settle_then_publish(ex, rec, counts, billed,
                                                                   estimated, cost))  # fmt: skip
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        else:
            self._published(ex, rec, counts, billed, estimated, spent)
        try:
            self.metrics.record(rec, ex.info.operation or "other", ex.info.model)
        except Exception:
            log.exception("metrics failed for %s", ex.id)
        return rec

    async def _settle(self, ex: Meter, cost: Decimal | None) -> Decimal | None:
        """Settle the request's reservation; the session's spend it returned (None: the
        ledger failed, logged)."""
        assert ex.reservation is not None
        try:
            change = await self.ledger.settle(ex.reservation, cost)
        except Exception:
            log.exception("budget ledger failed to settle %s", ex.id)
            return None
        self.apply(change)
        return change.spent

    async def _settle_then_publish(
        self,
        ex: Meter,
        rec: MessageRecord,
        counts: TokenCounts,
        billed: Charge,
        estimated: bool,
        cost: Decimal | None,
    ) -> None:
        self._published(ex, rec, counts, billed, estimated, await self._settle(ex, cost))

    async def drain(self) -> None:
        """Wait for the settles sent after their responses (shutdown, before the ledger
        closes)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _published(
        self,
        ex: Meter,
        rec: MessageRecord,
        counts: TokenCounts,
        billed: Charge,
        estimated: bool,
        spent: Decimal | None,
    ) -> None:
        """The row's final ``token.usage`` (``spent``: the session's spend that the
        settle returned; None: none did, this replica's last view of it) and the context
        meter. A free call (HEAD, model listings, count_tokens) is no message: nothing."""
        if not ex.info.metered:
            return
        if spent is None:
            spent = self.ledger.cached_spent(rec.session_id)
        model, provider = rec.model, rec.provider
        self._publish(
            self._usage_event(
                ex, counts, rec.cost_usd, spent, final=True, estimated=estimated, billed=billed
            )
        )
        if ex.status < 400 and counts.total_tokens:
            price = self.prices.resolve(model, provider) if model else None  # priced or not
            window = price.context_window if price else None
            make = functools.partial(
                context_data, rec.session_id, model, counts.total_tokens, window
            )
            self._publish(Event(CONTEXT_USAGE, rec.session_id, make=make))

    def _usage_event(
        self,
        ex: Meter,
        counts: TokenCounts,
        cost: Decimal | None,
        session_cost: Decimal,
        *,
        final: bool,
        estimated: bool,
        billed: Charge | None = None,
    ) -> Event:
        target = ex.target
        make = functools.partial(
            token_usage_data,
            message_id=ex.id,
            session_id=target.session_id,
            agent_id=target.agent_id,
            provider=target.route.provider,
            model=ex.model,
            counts=counts,
            cost=cost,
            session_cost=session_cost,
            final=final,
            estimated=estimated,
            timestamp=time.time(),
            transport=ex.transport,
            billed=billed,
        )
        return Event(TOKEN_USAGE, target.session_id, make=make)
