"""Prometheus metrics on an injected registry, plus the OTel GenAI histograms
(docs/reference.md §9).

:meth:`Metrics.record` runs once per finished upstream response, after the client has
its last byte, and the accountant guards it, so a metrics failure never breaks
forwarding. What it updates are plain dicts (:class:`PlainCounter`,
:class:`PlainHistogram`) that prometheus_client turns into families at scrape time, so
recording is a few dict updates with no locks (it all runs on the event loop). Gauges
that mirror state (paused sessions, subscribers, queue depth, budget use) are read
at scrape time and cost the request path nothing.

Cardinality: series are per route, provider, model, status, token type. Clients choose
model names, so the ``model`` and ``gen_ai_request_model`` values are bounded by
:class:`ModelLabels`: every model the price table names keeps its own value; on the
counters so do the first ``max_models`` other names (on the histograms, a tenth of
them); any other is counted as ``other``.
A ``session`` label is added to requests, tokens and cost only with
``metrics_session_labels`` (``SPENDGATE_METRICS_SESSION_LABELS=true``). The one
per-session exception is
``spendgate_session_budget_used_ratio{session}`` (with ``spendgate_session_budget_usd``
and ``spendgate_session_spent_usd``): exported only for sessions that have a budget,
and at most ``budget_series_limit`` of them (those closest to their budget), so the
alert "session over 90 % of budget" works without opening the door to unbounded series.

The OTel GenAI histograms use the semantic conventions' names and values
(``gen_ai.provider.name`` ``gcp.gemini``, ``gen_ai.operation.name`` ``chat``, ...) and
count only GenAI operations; token usage is the provider's own report, so error
responses and estimated (aborted) streams add a duration but no token usage.
"""

from __future__ import annotations

import itertools
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from spendgate.records import MessageRecord

if TYPE_CHECKING:
    from spendgate.pricing import PriceTable

log = logging.getLogger("spendgate.metrics")

# LLM latencies: 10 ms (a cached or tiny answer) to 5 min (a long reasoning stream).
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 180, 300,
)  # fmt: skip
# The OTel GenAI semantic conventions' advised boundaries: tokens in powers of 4,
# seconds doubling from 10 ms (extended past 81.92 s to cover 5 min).
GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    163.84, 327.68,
)  # fmt: skip
TOKEN_TYPES = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)
# spendgate operation → gen_ai.operation.name (semantic conventions' well-known values).
GENAI_OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "messages": "chat",
    "ollama_chat": "chat",
    "completions": "text_completion",
    "ollama_generate": "text_completion",
    "embeddings": "embeddings",
    "generate_content": "generate_content",
    "stream_generate_content": "generate_content",
}
# spendgate provider id → gen_ai.provider.name where the conventions spell it differently.
GENAI_PROVIDERS = {
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "azure": "azure.ai.openai",
    "bedrock": "aws.bedrock",
    "mistral": "mistral_ai",
    "xai": "x_ai",
}
UNMETERED = ("", "other")
OTHER_MODEL = "other"
"""The ``model`` value of every model past the cap (:class:`ModelLabels`)."""
HISTOGRAM_SHARE = 10
"""The histograms give a value of their own to 1/10 of the names the counters do
besides the price table's (10 of the default 100): a value costs them 91 series."""
SERIES_CACHE_LIMIT = 10_000
"""Entries of the per-response series cache; it is cleared when full (it only finds
cells, which live on in their counters)."""
_ZERO = Decimal(0)

BudgetSource = Callable[[], Iterable[tuple[str, Decimal, Decimal]]]
"""Yields ``(session, budget_usd, spent_usd)`` for every session that has a budget."""


class PlainCounter:
    """A labelled counter kept as plain Python numbers, exported at scrape time.

    Everything that records runs on the event loop thread, so there is no lock to take.
    Each series is a one-element list (a cell) that :class:`Metrics` keeps a reference
    to, so counting is ``cell[0] += n``. Money is summed in ``Decimal`` and exported as
    the nearest float: ``spendgate_cost_usd_total`` is ``float(sum of the rows' costs)``,
    exact however many requests there are, not a float sum.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self._name, self._doc, self._labelnames = name, documentation, labelnames
        self.cells: dict[tuple[str, ...], list[Any]] = {}

    def cell(self, labels: tuple[str, ...], zero: int | Decimal = 0) -> list[Any]:
        """The series for ``labels``, created at ``zero`` if it does not exist yet."""
        found = self.cells.get(labels)
        if found is None:
            found = self.cells[labels] = [zero]
        return found

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, (total,) in list(self.cells.items()):
            family.add_metric(labels, float(total))
        yield family


class PlainHistogram:
    """A labelled histogram kept as per-bucket counts, cumulated only at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ) -> None:
        self._name, self._doc, self._labelnames = name, documentation, labelnames
        self.bounds = (*buckets, math.inf)
        self._les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self.rows: dict[tuple[str, ...], list[float]] = {}
        """labels → [count in each bucket (not cumulative)..., sum]"""

    def row(self, labels: tuple[str, ...]) -> list[float]:
        found = self.rows.get(labels)
        if found is None:
            found = self.rows[labels] = [0] * (len(self.bounds) + 1)
        return found

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, row in list(self.rows.items()):
            cumulative = itertools.accumulate(row[:-1])
            family.add_metric(labels, list(zip(self._les, cumulative, strict=True)), row[-1])
        yield family


def _checked_counts(m: MessageRecord) -> tuple[int, ...]:
    """The row's token counts in the order of TOKEN_TYPES; a negative count or cost raises."""
    counts = (
        m.input_tokens,
        m.output_tokens,
        m.cached_input_tokens,
        m.cache_write_tokens,
        m.reasoning_tokens,
    )
    if min(counts) < 0 or (m.cost_usd is not None and m.cost_usd < 0):
        raise ValueError("counters only go up")
    return counts


def _observe(row: list[float], bounds: tuple[float, ...], value: float) -> None:
    row[bisect_left(bounds, value)] += 1  # ``le`` is inclusive
    row[-1] += value


@dataclass(slots=True)
class _Series:
    """The cells one kind of response updates (same route, model, status, operation...),
    found with one dict look-up per response. Cells that must not exist until first used
    (a cost series for an unpriced model, GenAI token rows) start as None."""

    requests: list[Any]
    tokens: tuple[list[Any], ...]
    """Cells for TOKEN_TYPES, in order; empty for unmetered operations."""
    duration: list[float]
    ttft: list[float]
    genai_duration: list[float] | None
    cost_labels: tuple[str, ...]
    genai_labels: tuple[str, str, str]
    genai_usage: bool
    """Token usage goes to the GenAI histograms (a successful response, not estimated)."""
    error_kind: str | None
    """``upstream_errors``' kind for this status (http_429, http_5xx), if it is one."""
    errors: Counter | None = None
    """That counter's child, once used."""
    cost: list[Any] | None = None
    unpriced: list[Any] | None = None
    genai_input: list[float] | None = None
    genai_output: list[float] | None = None


class ModelLabels:
    """Bounded model label values. Clients choose model names, so only these get a value
    of their own:

    - on the counters (``model`` of requests, tokens, cost, unpriced responses): every
      model the price table names, and the first ``limit`` other names;
    - on the histograms (``model`` of the durations, ``gen_ai_request_model``), where a
      value costs 17 to 34 series instead of 7: every model the price table names, and
      the first ``limit / 10`` other names (:data:`HISTOGRAM_SHARE`).

    Any other name is ``other``. A name keeps the value it got first, so a series never
    changes meaning, and the ``other`` series count everything they stand for."""

    __slots__ = ("_known", "_others", "_prices", "_timed", "_warned", "limit", "timed_limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.timed_limit = limit // HISTOGRAM_SHARE
        self._known = {"unknown", OTHER_MODEL}
        """Names the price table names (found so far)."""
        self._others: set[str] = set()
        """The first ``limit`` other names: their own value on the counters."""
        self._timed: set[str] = set()
        """The first ``timed_limit`` other names seen by the histograms: their own value there."""
        self._prices: PriceTable | None = None
        self._warned = False

    def bind(self, prices: PriceTable) -> None:
        self._prices = prices

    def known(self, model: str, provider: str) -> bool:
        """Does the price table name this model itself: exactly, as ``provider/model``, or
        as an alias (not by dropping a prefix or a date, which clients can vary without
        end)?"""
        if model in self._known:
            return True
        prices = self._prices
        if prices is None:
            return False
        if model in prices or f"{provider}/{model}" in prices or model in prices.aliases:
            self._known.add(model)
            return True
        return False

    def bounded(self, model: str) -> bool:
        """Has this name a value of its own anywhere (so it may key a cache)?"""
        return model in self._others or model in self._known or model in self._timed

    def counter(self, model: str, provider: str) -> str:
        """The value on the counters."""
        value = self._value(model, provider, self._others, self.limit)
        if value is OTHER_MODEL and model != OTHER_MODEL and not self._warned:
            self._warned = True
            log.warning(
                "metrics: %d models the price table does not name have their own label "
                '(SPENDGATE_METRICS_MAX_MODELS); any other is counted as model="%s"',
                self.limit, OTHER_MODEL,
            )  # fmt: skip
        return value

    def histogram(self, model: str, provider: str) -> str:
        """The value on the histograms."""
        return self._value(model, provider, self._timed, self.timed_limit)

    def _value(self, model: str, provider: str, own: set[str], limit: int) -> str:
        """``model`` if the table names it or ``own`` holds it (or, while it holds fewer
        than ``limit``, takes it), else ``other``."""
        if model in own or self.known(model, provider):
            return model
        if len(own) < limit:
            own.add(model)
            return model
        return OTHER_MODEL


class SessionBudgets:
    """Per-session budget use, read from the ledger at scrape time.

    Only sessions with a budget appear, at most ``limit`` of them (highest ratio first).
    A zero budget counts as fully used (ratio 1).
    """

    RATIO = "spendgate_session_budget_used_ratio"
    BUDGET = "spendgate_session_budget_usd"
    SPENT = "spendgate_session_spent_usd"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.source: BudgetSource | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                self.RATIO, "Spent / budget of sessions that have a budget", labels=("session",)
            ),
            GaugeMetricFamily(self.BUDGET, "Budget of sessions that have one", labels=("session",)),
            GaugeMetricFamily(
                self.SPENT, "Spent so far by sessions that have a budget", labels=("session",)
            ),
        )

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        ratio, budget, spent = self._families()
        rows: list[tuple[float, str, Decimal, Decimal]] = []
        try:
            for sid, b, s in self.source() if self.source else ():
                rows.append((float(s / b) if b > 0 else 1.0, sid, b, s))
        except Exception:  # a scrape must not fail because the ledger did
            log.exception("could not read session budgets for metrics")
            rows = []
        rows.sort(key=lambda r: (-r[0], r[1]))
        for r, sid, b, s in rows[: self.limit]:
            ratio.add_metric((sid,), r)
            budget.add_metric((sid,), float(b))
            spent.add_metric((sid,), float(s))
        yield from (ratio, budget, spent)


class Metrics:
    """Every metric of docs/reference.md §9, on ``registry`` (a fresh one per app or test)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        session_labels: bool = False,
        budget_series_limit: int = 500,
        max_models: int = 100,
    ) -> None:
        self.registry = registry
        self.session_labels = session_labels
        self.model_labels = ModelLabels(max_models)
        s = ("session",) if session_labels else ()
        r = registry
        # Recorded once per response on the hot path: plain dicts, exported at scrape time.
        self._series: dict[tuple[Any, ...], _Series] = {}
        self.requests = PlainCounter(
            "spendgate_requests",
            "Upstream responses (and spendgate's own 502/504)",
            ("route", "provider", "model", "status", *s),
        )
        self.tokens = PlainCounter(
            "spendgate_tokens",
            "Tokens billed, by type (input includes cached_input, output includes reasoning)",
            ("provider", "model", "type", *s),
        )
        self.cost = PlainCounter(
            "spendgate_cost_usd", "Cost in USD of priced responses", ("provider", "model", *s)
        )
        self.unpriced = PlainCounter(
            "spendgate_unpriced_responses",
            "Responses whose cost is unknown (no price)",
            ("provider", "model"),
        )
        self.duration = PlainHistogram(
            "spendgate_request_duration_seconds",
            "Whole request duration, to the last byte",
            ("provider", "model"),
            LATENCY_BUCKETS,
        )
        self.ttft = PlainHistogram(
            "spendgate_time_to_first_token_seconds",
            "Time to the first response byte",
            ("provider", "model"),
            LATENCY_BUCKETS,
        )
        self.genai_tokens = PlainHistogram(
            "gen_ai_client_token_usage",
            "OpenTelemetry GenAI: tokens per operation (reported usage of successful responses)",
            (
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_operation_name",
                "gen_ai_token_type",
            ),
            GENAI_TOKEN_BUCKETS,
        )
        self.genai_duration = PlainHistogram(
            "gen_ai_client_operation_duration_seconds",
            "OpenTelemetry GenAI: operation duration",
            ("gen_ai_provider_name", "gen_ai_request_model", "gen_ai_operation_name"),
            GENAI_DURATION_BUCKETS,
        )
        for collector in (
            self.requests, self.tokens, self.cost, self.unpriced, self.duration, self.ttft,
            self.genai_tokens, self.genai_duration,
        ):  # fmt: skip
            r.register(collector)
        # Rare events (errors, refusals) and scrape-time gauges: prometheus_client's own.
        self.upstream_errors = Counter(
            "spendgate_upstream_errors",
            "Upstream failures by kind: connect, timeout, reset "
            "(transport), http_5xx, http_429 (error responses)",
            ("route", "kind"),
            registry=r,
        )
        self.budget_rejections = Counter(
            "spendgate_budget_rejections",
            "Requests refused for budget (402) or after waiting for headroom (429), by code",
            ("route", "code"),
            registry=r,
        )
        self.active_streams = 0
        """Responses being streamed now (the proxy counts; the gauge reads it)."""
        Gauge("spendgate_active_streams", "Responses being streamed now", registry=r).set_function(
            lambda: self.active_streams
        )
        self.paused_sessions = Gauge("spendgate_paused_sessions", "Sessions paused now", registry=r)
        self.event_subscribers = Gauge(
            "spendgate_event_subscribers", "Connected /api/events clients", registry=r
        )
        self.store_queue = Gauge(
            "spendgate_store_queue_depth", "Rows waiting for the database writer", registry=r
        )
        self.store_dropped = Counter(
            "spendgate_store_dropped_rows", "Rows dropped because the queue overflowed", registry=r
        )
        self.store_rejected = Counter(
            "spendgate_store_rejected_rows",
            "Rows the database refused (kept in its rejected_rows table, with the reason)",
            registry=r,
        )
        self.store_write_errors = Counter(
            "spendgate_store_write_errors",
            "Batches the database failed to write (full disk, I/O error, locked); kept queued",
            registry=r,
        )
        self.webhook_alerts = Counter(
            "spendgate_webhook_alerts",
            "Webhook alerts by outcome: sent, failed (not taken after every retry), "
            "dropped (the queue was full)",
            ("outcome",),
            registry=r,
        )
        self.session_budgets = SessionBudgets(budget_series_limit)
        r.register(self.session_budgets)

    def bind_gauges(
        self,
        paused: Callable[[], float],
        subscribers: Callable[[], float],
        queue: Callable[[], float],
        budgets: BudgetSource | None = None,
    ) -> None:
        """Gauges read at scrape time, so nothing needs updating on the hot path."""
        self.paused_sessions.set_function(paused)
        self.event_subscribers.set_function(subscribers)
        self.store_queue.set_function(queue)
        self.session_budgets.source = budgets

    def bind_prices(self, prices: PriceTable) -> None:
        """The models this table names keep their own ``model`` label whatever the cap."""
        self.model_labels.bind(prices)

    def record(self, m: MessageRecord, operation: str, requested_model: str | None) -> None:
        """Everything one finished upstream response adds to the metrics."""
        session = m.session_id if self.session_labels else None
        key = (m.route, m.provider, m.model, m.status, operation, requested_model, session)
        series = self._series.get(key) or self._new_series(key, m, operation, requested_model)
        counts = _checked_counts(m)
        series.requests[0] += 1
        self._count_tokens(series, counts)
        self._count_cost(series, m.cost_usd)
        if series.error_kind is not None and m.error is None:  # an error response's status
            self._count_upstream_error(series, m.route)
        self._observe_times(series, m)

    def _count_tokens(self, series: _Series, counts: tuple[int, ...]) -> None:
        if series.tokens:  # in the order of TOKEN_TYPES
            for cell, n in zip(series.tokens, counts, strict=True):
                cell[0] += n
        elif any(counts):  # unmetered: only the types it reports get a series
            pm, s = series.cost_labels[:2], series.cost_labels[2:]
            for (type_, _), n in zip(TOKEN_TYPES, counts, strict=True):
                if n:
                    self.tokens.cell((*pm, type_, *s))[0] += n

    def _count_cost(self, series: _Series, cost: Decimal | None) -> None:
        if cost is not None:
            if series.cost is None:
                series.cost = self.cost.cell(series.cost_labels, _ZERO)
            series.cost[0] += cost
        elif series.genai_duration is not None:  # metered, and no price
            if series.unpriced is None:
                series.unpriced = self.unpriced.cell(series.cost_labels[:2])
            series.unpriced[0] += 1

    def _count_upstream_error(self, series: _Series, route: str) -> None:
        if series.errors is None:  # created on first use: no http_5xx series at 0
            series.errors = self.upstream_errors.labels(route, series.error_kind)
        series.errors.inc()

    def _observe_times(self, series: _Series, m: MessageRecord) -> None:
        seconds = m.duration_ms / 1000
        _observe(series.duration, self.duration.bounds, seconds)
        if m.ttft_ms is not None:
            _observe(series.ttft, self.ttft.bounds, m.ttft_ms / 1000)
        if series.genai_duration is None:
            return  # not a GenAI operation (model lists, token counting, ...)
        _observe(series.genai_duration, self.genai_duration.bounds, seconds)
        if series.genai_usage and not m.estimated:  # the provider's own report of usage
            self._observe_genai_tokens(series, m)

    def _observe_genai_tokens(self, series: _Series, m: MessageRecord) -> None:
        if series.genai_input is None:
            genai = series.genai_labels
            series.genai_input = self.genai_tokens.row((*genai, "input"))
            if genai[2] != "embeddings":
                series.genai_output = self.genai_tokens.row((*genai, "output"))
        bounds = self.genai_tokens.bounds
        _observe(series.genai_input, bounds, m.input_tokens)
        if series.genai_output is not None:
            _observe(series.genai_output, bounds, m.output_tokens)

    def _new_series(
        self,
        key: tuple[Any, ...],
        m: MessageRecord,
        operation: str,
        requested_model: str | None,
    ) -> _Series:
        labels, provider = self.model_labels, m.provider
        name = m.model or "unknown"
        model = labels.counter(name, provider)
        timed = labels.histogram(name, provider)
        requested = labels.histogram(requested_model, provider) if requested_model else timed
        if model != name or (requested_model and not labels.bounded(requested_model)):
            # Cached under its label values, not under the names: clients choose names
            # without end, the values are bounded.
            key = (m.route, provider, model, timed, m.status, operation, requested, key[-1])
            found = self._series.get(key)
            if found is not None:
                return found
        if len(self._series) >= SERIES_CACHE_LIMIT:
            self._series.clear()
        s = (m.session_id,) if self.session_labels else ()
        pm = (provider, model)
        metered = operation not in UNMETERED
        genai = (
            GENAI_PROVIDERS.get(provider, provider),
            requested,
            GENAI_OPERATIONS.get(operation, operation),
        )
        status = m.status
        series = self._series[key] = _Series(
            requests=self.requests.cell((m.route, *pm, str(status), *s)),
            # metered models get every token type's series, from zero
            tokens=tuple(self.tokens.cell((*pm, t, *s)) for t, _ in TOKEN_TYPES) if metered else (),
            duration=self.duration.row((provider, timed)),
            ttft=self.ttft.row((provider, timed)),
            genai_duration=self.genai_duration.row(genai) if metered else None,
            cost_labels=(*pm, *s),
            genai_labels=genai,
            genai_usage=status < 400,
            error_kind="http_429" if status == 429 else "http_5xx" if status >= 500 else None,
        )
        return series
