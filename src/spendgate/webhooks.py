"""Alerts to a webhook (``SPENDGATE_WEBHOOK_URL``, docs/reference.md §7 "Webhook"): the
budget and context events an operator acts on, POSTed as JSON with a Slack-compatible
``text`` field.

A subscriber of the event bus like any other. It must never slow the proxy down, so
the bus hands events to a pump that only filters them into a bounded queue (the bus
never waits and never drops this subscriber); one sender posts them in order, each with
a timeout and a bounded number of retries with backoff. Past the queue's bound the newest
alerts are dropped, counted and logged; so are the ones a receiver never took.

The URL is often a secret itself (a Slack incoming webhook's path is its credential):
it is never logged, only its scheme and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import aiohttp
from yarl import URL

from spendgate.bus import EventBus, Subscription
from spendgate.events import (
    BUDGET_PAUSED,
    BUDGET_RESUMED,
    BUDGET_UNENFORCEABLE,
    BUDGET_WARNING,
    CONTEXT_USAGE,
    Event,
)
from spendgate.render import budget_usd, usd

log = logging.getLogger("spendgate.webhooks")

CONTEXT_CRITICAL = "context.critical"
"""A ``context.usage`` event whose level became ``critical`` (≥ 90 % of the window) for
a session: sent when the level is reached, not again until it has dropped below."""
ALERT_TYPES = (
    BUDGET_WARNING,
    BUDGET_PAUSED,
    BUDGET_RESUMED,
    BUDGET_UNENFORCEABLE,
    CONTEXT_CRITICAL,
)
"""What ``webhook_events`` may name; all of them by default."""

QUEUE_SIZE = 1000
"""Alerts waiting for the receiver; past it the newest are dropped (counted, logged)."""
TIMEOUT_S = 5.0
"""Each POST as a whole, connection included."""
RETRIES = 3
"""Further attempts after a failed one (timeout, connection error, 429, 5xx)."""
BACKOFF_S = 1.0
"""The first wait before a retry, doubled each time (1, 2, 4 s)."""
MAX_SESSIONS = 10_000
"""Sessions whose context level is remembered (for ``context.critical`` once per rise)."""


def _who(data: dict[str, Any]) -> str:
    scope = data.get("scope")
    if scope == "global":
        period = data.get("period")
        return "the global budget" + (f" ({period})" if period and period != "total" else "")
    session = f"session {data.get('sessionId')}"
    if scope == "agent":
        return f"agent {data.get('agentId')} in {session}"
    return session


def alert_text(kind: str, data: dict[str, Any]) -> str:
    """The one-line ``text`` a chat tool shows."""
    if kind == BUDGET_WARNING:
        share = round(float(data.get("threshold") or 0) * 100)
        return (
            f"spendgate: {_who(data)} has used {share}% of its budget "
            f"({usd(data.get('spentUsd'))} of {budget_usd(data.get('budgetUsd'))})"
        )
    if kind == BUDGET_PAUSED:
        return (
            f"spendgate: {_who(data)} is paused ({data.get('reason')}): "
            f"{usd(data.get('spentUsd'))} spent of {budget_usd(data.get('budgetUsd'))}"
        )
    if kind == BUDGET_RESUMED:
        return f"spendgate: {_who(data)} resumed ({data.get('reason')})"
    if kind == BUDGET_UNENFORCEABLE:
        return (
            f"spendgate: session {data.get('sessionId')}: model {data.get('modelId')} has "
            f"no price, so its {data.get('scope')} budget does not limit it"
        )
    return (
        f"spendgate: session {data.get('sessionId')}'s context is {data.get('percent')}% full "
        f"({data.get('contextTokens'):,} of {data.get('contextWindow'):,} tokens, "
        f"model {data.get('modelId')})"
    )


def _where(url: str) -> str:
    """The URL as it may be logged: scheme, host and port, never the path or query."""
    u = URL(url)
    return f"{u.scheme}://{u.host}" + (f":{u.explicit_port}" if u.explicit_port else "")


class Webhooks:
    """The webhook subscriber: :meth:`start` on a bus, :meth:`close` at shutdown."""

    def __init__(
        self, url: str, events: Collection[str], counted: Callable[[str], None] | None = None
    ) -> None:
        """``counted``: told each alert's outcome, ``sent``, ``failed`` or ``dropped``
        (the metric ``spendgate_webhook_alerts_total``)."""
        self.url = url
        self._counted = counted
        self.events = frozenset(events)
        self.where = _where(url)
        self.queue: asyncio.Queue[tuple[str, Event]] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0
        self.dropped = 0
        """Alerts dropped because the queue was full."""
        self.failed = 0
        """Alerts the receiver did not take after every retry (or refused with a 4xx)."""
        self._critical: dict[str, bool] = {}
        self._bus: EventBus | None = None
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._last_drop_log = 0.0

    def _bus_types(self) -> list[str]:
        types = [t for t in self.events if t != CONTEXT_CRITICAL]
        return [*types, CONTEXT_USAGE] if CONTEXT_CRITICAL in self.events else types

    async def start(self, bus: EventBus) -> None:
        self._bus = bus
        self._sub, _ = await bus.subscribe((), self._bus_types(), None)
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tasks = [
            asyncio.ensure_future(self._pump(self._sub)),
            asyncio.ensure_future(self._send_all()),
        ]
        log.info("webhook alerts (%s) to %s", ", ".join(sorted(self.events)), self.where)

    async def close(self) -> None:
        """Idempotent: at shutdown before the bus closes, and again at cleanup."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._bus is not None and self._sub is not None:
            self._bus.unsubscribe(self._sub)
            self._sub = None
        if self._http is not None:
            await self._http.close()
        left = self.queue.qsize()
        if left and tasks:
            log.warning("%d webhook alerts not delivered at shutdown (%s)", left, self.where)

    # -- the pump: the bus's subscriber, quick by design ------------------------------------

    async def _pump(self, sub: Subscription) -> None:
        while True:
            event = await sub.get()
            if event is None:  # the bus dropped it, its queue full: what was in it is lost
                assert self._bus is not None
                log.warning(
                    "the event bus dropped the webhook subscriber (its queue was full): the "
                    "alerts in it are lost; subscribing again"
                )
                self._sub = sub = (await self._bus.subscribe((), self._bus_types(), None))[0]
                continue
            kind = self._alert(event)
            bus = self._bus
            if kind is not None and bus is not None and await bus.claim("webhook", event):
                self._enqueue(kind, event)  # claimed: once across replicas

    def _alert(self, event: Event) -> str | None:
        """The alert an event is, if one is asked for."""
        if event.type != CONTEXT_USAGE:
            return event.type if event.type in self.events else None
        session, critical = event.session_id, event.data.get("level") == "critical"
        was = self._critical.pop(session, False)  # re-inserted: the newest stay
        if len(self._critical) < MAX_SESSIONS:
            self._critical[session] = critical
        return CONTEXT_CRITICAL if critical and not was else None

    def _enqueue(self, kind: str, event: Event) -> None:
        try:
            self.queue.put_nowait((kind, event))
        except asyncio.QueueFull:
            self.dropped += 1
            self._count("dropped")
            now = time.monotonic()
            if now - self._last_drop_log >= 10:  # one line per 10 s at most, with the count
                self._last_drop_log = now
                log.warning(
                    "webhook queue full (%d alerts waiting for %s): %d alerts dropped so far",
                    QUEUE_SIZE, self.where, self.dropped,
                )  # fmt: skip

    # -- the sender -------------------------------------------------------------------------

    async def _send_all(self) -> None:
        while True:
            kind, event = await self.queue.get()
            body = {
                "text": alert_text(kind, event.data),
                "event": kind,
                "id": event.id,
                "data": event.data,
            }
            if await self._post(body):
                self.sent += 1
                self._count("sent")
            else:
                self.failed += 1
                self._count("failed")

    def _count(self, outcome: str) -> None:
        if self._counted is not None:
            try:
                self._counted(outcome)
            except Exception:  # a metric never stops alerts
                log.exception("webhook metric failed")

    async def _post(self, body: dict[str, Any]) -> bool:
        """One alert, retried with backoff; True once the receiver took it (2xx)."""
        assert self._http is not None
        why = ""
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                async with self._http.post(self.url, json=body, allow_redirects=False) as r:
                    if r.status < 300:
                        return True
                    why = f"HTTP {r.status}"
                    if r.status < 500 and r.status != 429:
                        break  # the receiver refuses it: asking again changes nothing
            except TimeoutError:
                why = f"no answer in {TIMEOUT_S:g} s"
            except aiohttp.ClientError as exc:
                why = type(exc).__name__
        log.warning(
            "webhook alert %s not delivered to %s (%s, after %d attempts)",
            body["event"], self.where, why, attempt + 1,
        )  # fmt: skip
        return False
