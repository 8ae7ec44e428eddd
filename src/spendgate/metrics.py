"""Prometheus metrics on an injected registry (SPEC 8), plus the OTel GenAI histograms.

Recording is called by the accountant, which guards it so a metrics failure never
breaks forwarding.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spendgate.records import MessageRecord

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
TOKEN_TYPES = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)


class Metrics:
    def __init__(self, registry: CollectorRegistry, session_labels: bool = False) -> None:
        self.registry = registry
        self.session_labels = session_labels
        s = ("session",) if session_labels else ()
        self.requests = Counter(
            "spendgate_requests", "Upstream responses", ("route", "provider", "model", "status", *s),
            registry=registry,
        )
        self.tokens = Counter(
            "spendgate_tokens", "Tokens by type", ("provider", "model", "type", *s), registry=registry
        )
        self.cost = Counter(
            "spendgate_cost_usd", "Cost in USD", ("provider", "model", *s), registry=registry
        )
        self.duration = Histogram(
            "spendgate_request_duration_seconds", "Whole request duration",
            ("provider", "model"), buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.ttft = Histogram(
            "spendgate_time_to_first_token_seconds", "Time to the first response byte",
            ("provider", "model"), buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_errors = Counter(
            "spendgate_upstream_errors", "Upstream failures by kind", ("route", "kind"),
            registry=registry,
        )
        self.budget_rejections = Counter(
            "spendgate_budget_rejections", "Requests refused with 402", ("route",), registry=registry
        )
        self.active_streams = Gauge(
            "spendgate_active_streams", "Responses being streamed now", registry=registry
        )
        self.paused_sessions = Gauge(
            "spendgate_paused_sessions", "Sessions paused now", registry=registry
        )
        self.event_subscribers = Gauge(
            "spendgate_event_subscribers", "Connected /api/events clients", registry=registry
        )
        self.store_queue = Gauge(
            "spendgate_store_queue_depth", "Rows waiting for the database writer", registry=registry
        )
        self.store_dropped = Counter(
            "spendgate_store_dropped_rows", "Rows dropped because the queue overflowed",
            registry=registry,
        )
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage", "OpenTelemetry GenAI: tokens per operation",
            ("gen_ai_provider_name", "gen_ai_request_model", "gen_ai_operation_name",
             "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "OpenTelemetry GenAI: operation duration",
            ("gen_ai_provider_name", "gen_ai_request_model", "gen_ai_operation_name"),
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip

    def bind_gauges(
        self, paused: Callable[[], float], subscribers: Callable[[], float], queue: Callable[[], float]
    ) -> None:
        """Gauges read at scrape time, so nothing needs updating on the hot path."""
        self.paused_sessions.set_function(paused)
        self.event_subscribers.set_function(subscribers)
        self.store_queue.set_function(queue)

    def record(self, m: MessageRecord, operation: str, requested_model: str | None) -> None:
        """Everything one finished upstream response adds to the metrics."""
        model = m.model or "unknown"
        s = (m.session_id,) if self.session_labels else ()
        self.requests.labels(m.route, m.provider, model, str(m.status), *s).inc()
        for type_, attr in TOKEN_TYPES:
            n = getattr(m, attr)
            if n:
                self.tokens.labels(m.provider, model, type_, *s).inc(n)
        if m.cost_usd:
            self.cost.labels(m.provider, model, *s).inc(float(m.cost_usd))
        self.duration.labels(m.provider, model).observe(m.duration_ms / 1000)
        if m.ttft_ms is not None:
            self.ttft.labels(m.provider, model).observe(m.ttft_ms / 1000)
        req_model = requested_model or model
        self.genai_duration.labels(m.provider, req_model, operation).observe(m.duration_ms / 1000)
        if m.status < 400:
            self.genai_tokens.labels(m.provider, req_model, operation, "input").observe(m.input_tokens)
            self.genai_tokens.labels(m.provider, req_model, operation, "output").observe(
                m.output_tokens
            )
