"""Prometheus metrics (docs/reference.md §9): names, labels, exact values, and a real
scrape after SDK traffic."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter as Tally
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from spendgate.metrics import LATENCY_BUCKETS, SERIES_CACHE_LIMIT, Metrics
from spendgate.price_files import load_price_table
from spendgate.records import MessageRecord
from spendgate.settings import Settings
from tests.conftest import Proxy, StartProxy, eventually
from tests.events_client import EventsClient
from tests.helpers.records import message
from tests.helpers.traffic import HI, expected_rows, oa, row_cost_totals, send_traffic, stream_chunk
from tests.upstream import FakeUpstream, fixture_reply, json_reply, sse_reply

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# docs/reference.md §9: every metric and exactly its labels (histograms: the labels besides ``le``).
SPEC_METRICS = {
    "spendgate_requests_total": {"route", "provider", "model", "status"},
    "spendgate_tokens_total": {"provider", "model", "type"},
    "spendgate_cost_usd_total": {"provider", "model"},
    "spendgate_request_duration_seconds": {"provider", "model"},
    "spendgate_time_to_first_token_seconds": {"provider", "model"},
    "spendgate_upstream_errors_total": {"route", "kind"},
    "spendgate_budget_rejections_total": {"route", "code"},
    "spendgate_active_streams": set(),
    "spendgate_paused_sessions": set(),
    "spendgate_event_subscribers": set(),
    "gen_ai_client_token_usage": {
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_operation_name",
        "gen_ai_token_type",
    },
    "gen_ai_client_operation_duration_seconds": {
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_operation_name",
    },
}
HISTOGRAMS = {
    "spendgate_request_duration_seconds",
    "spendgate_time_to_first_token_seconds",
    "gen_ai_client_token_usage",
    "gen_ai_client_operation_duration_seconds",
}
BUDGET_FAMILIES = (
    "spendgate_session_budget_used_ratio",
    "spendgate_session_budget_usd",
    "spendgate_session_spent_usd",
)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def registry_samples(registry: CollectorRegistry) -> Samples:
    samples: Samples = {}
    for family in registry.collect():
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def scrape(proxy: Proxy) -> Samples:
    async with proxy.http.get(proxy.url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


# -- the Metrics object on its own registry --------------------------------------------------


def test_record_exports_exact_values() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(message(), "chat", "gpt-4o")
    metrics.record(message(id="msg_2", cost_usd=Decimal("0.000055")), "chat", "gpt-4o")
    s = registry_samples(registry)
    m = {"provider": "openai", "model": "gpt-4o-2024-08-06"}
    assert value(s, "spendgate_requests_total", route="openai", status="200", **m) == 2
    for type_, n in (
        ("input", 1200),
        ("output", 300),
        ("cached_input", 1024),
        ("cache_write", 0),
        ("reasoning", 64),
    ):
        assert value(s, "spendgate_tokens_total", type=type_, **m) == 2 * n
    # summed as Decimal: exactly the float nearest 0.00036235, not a float sum's error
    assert value(s, "spendgate_cost_usd_total", **m) == float(Decimal("0.00036235"))
    assert value(s, "spendgate_request_duration_seconds_count", **m) == 2
    assert value(s, "spendgate_request_duration_seconds_sum", **m) == 3.0
    assert value(s, "spendgate_request_duration_seconds_bucket", le="1.0", **m) == 0
    assert value(s, "spendgate_request_duration_seconds_bucket", le="2.0", **m) == 2
    assert value(s, "spendgate_time_to_first_token_seconds_sum", **m) == 0.5
    genai = {
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "gpt-4o",  # the requested model, as the conventions say
        "gen_ai_operation_name": "chat",
    }
    assert value(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **genai) == 2400
    assert value(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **genai) == 600
    assert value(s, "gen_ai_client_token_usage_count", gen_ai_token_type="output", **genai) == 2
    assert value(s, "gen_ai_client_operation_duration_seconds_sum", **genai) == 3.0


def test_every_spec_metric_has_exactly_its_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(message(), "chat", "gpt-4o")
    metrics.upstream_errors.labels("openai", "timeout").inc()
    metrics.budget_rejections.labels("openai", "session_budget_exceeded").inc()
    families = {f.name: f for f in registry.collect()}
    for name, labels in SPEC_METRICS.items():
        base = name.removesuffix("_total")
        assert base in families, f"{name} is not exported"
        family = families[base]
        assert family.type == (
            "histogram"
            if name in HISTOGRAMS
            else "gauge"
            if not name.endswith("_total")
            else "counter"
        ), name
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == labels, (sample.name, sample.labels)


def test_latency_buckets_span_10ms_to_5min() -> None:
    registry = CollectorRegistry()
    Metrics(registry).record(message(), "chat", None)
    s = registry_samples(registry)
    for name in ("spendgate_request_duration_seconds", "spendgate_time_to_first_token_seconds"):
        les = sorted(float(dict(ls)["le"]) for (n, ls), _ in s.items() if n == name + "_bucket")
        assert les[0] == 0.01 and les[-2] == 300 and les[-1] == float("inf")
    assert tuple(sorted(LATENCY_BUCKETS)) == LATENCY_BUCKETS


def test_genai_semantic_convention_names() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(
        message(provider="gemini", route="gemini", model="gemini-2.5-flash"),
        "stream_generate_content",
        "gemini-2.5-flash",
    )
    metrics.record(
        message(provider="anthropic", route="anthropic", model="claude-sonnet-4-5"),
        "messages",
        "claude-sonnet-4-5",
    )
    metrics.record(message(endpoint="embeddings", output_tokens=0), "embeddings", "te-3-small")
    s = registry_samples(registry)
    ops = {
        (dict(ls)["gen_ai_provider_name"], dict(ls)["gen_ai_operation_name"])
        for (n, ls), _ in s.items()
        if n == "gen_ai_client_operation_duration_seconds_count"
    }
    assert ops == {
        ("gcp.gemini", "generate_content"),
        ("anthropic", "chat"),
        ("openai", "embeddings"),
    }
    types = {
        dict(ls)["gen_ai_token_type"]
        for (n, ls), _ in s.items()
        if n == "gen_ai_client_token_usage_count" and ("gen_ai_operation_name", "embeddings") in ls
    }
    assert types == {"input"}  # embeddings produce no output tokens


def test_errors_unknown_prices_and_unmetered_requests() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(
        message(
            status=500,
            input_tokens=0,
            output_tokens=0,
            cached_input_tokens=0,
            reasoning_tokens=0,
            cost_usd=Decimal(0),
        ),
        "chat",
        "gpt-4o",
    )
    metrics.record(message(status=429, cost_usd=Decimal(0)), "chat", "gpt-4o")
    # spendgate's own 504 is counted by the proxy as kind "timeout", not again here
    metrics.record(message(status=504, error="timeout", cost_usd=None), "chat", "gpt-4o")
    metrics.record(message(model="my-model", cost_usd=None), "chat", "my-model")
    metrics.record(
        message(
            model=None,
            endpoint="other",
            cost_usd=None,
            input_tokens=0,
            output_tokens=0,
            cached_input_tokens=0,
            reasoning_tokens=0,
        ),
        "other",
        None,
    )
    s = registry_samples(registry)
    assert value(s, "spendgate_upstream_errors_total", route="openai", kind="http_5xx") == 1
    assert value(s, "spendgate_upstream_errors_total", route="openai", kind="http_429") == 1
    assert total(s, "spendgate_upstream_errors_total") == 2
    # a known price of zero is a series at 0; an unknown price is no cost but is counted
    assert value(s, "spendgate_cost_usd_total", provider="openai", model="gpt-4o-2024-08-06") == 0
    assert value(s, "spendgate_cost_usd_total", provider="openai", model="my-model") is None
    assert value(s, "spendgate_unpriced_responses_total", provider="openai", model="my-model") == 1
    assert (
        value(s, "spendgate_tokens_total", provider="openai", model="my-model", type="input")
        == 1200
    )
    # a model list is a request, but no tokens and no GenAI operation
    assert (
        value(
            s,
            "spendgate_requests_total",
            route="openai",
            provider="openai",
            model="unknown",
            status="200",
        )
        == 1
    )
    assert total(s, "spendgate_tokens_total", model="unknown") == 0
    assert (
        total(s, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="unknown")
        == 0
    )
    # error responses and estimates are not GenAI token usage
    assert total(s, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 1


def test_session_labels_are_opt_in() -> None:
    off, on = CollectorRegistry(), CollectorRegistry()
    Metrics(off).record(message(), "chat", "gpt-4o")
    Metrics(on, session_labels=True).record(message(), "chat", "gpt-4o")
    assert not any("session" in dict(ls) for _, ls in registry_samples(off))
    s = registry_samples(on)
    m = {"provider": "openai", "model": "gpt-4o-2024-08-06", "session": "run-1"}
    assert value(s, "spendgate_requests_total", route="openai", status="200", **m) == 1
    assert value(s, "spendgate_tokens_total", type="output", **m) == 300
    assert value(s, "spendgate_cost_usd_total", **m) == 0.00030735
    # histograms stay per model: latency buckets per session would multiply the series
    assert not any(
        "session" in dict(ls) for n, ls in s if n.startswith("spendgate_request_duration")
    )


def test_session_budget_gauges_only_for_sessions_with_a_budget() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, budget_series_limit=2)
    ledger = [
        ("a", Decimal("10"), Decimal("9.5")),
        ("b", Decimal("4"), Decimal("1")),
        ("c", Decimal("0"), Decimal("0")),
        ("d", Decimal("100"), Decimal("1")),
    ]
    metrics.bind_gauges(lambda: 0, lambda: 0, lambda: 0, budgets=lambda: ledger)
    s = registry_samples(registry)
    ratios = {dict(ls)["session"]: v for (n, ls), v in s.items() if n == BUDGET_FAMILIES[0]}
    # the two closest to their budget; a zero budget is fully used
    assert ratios == {"a": 0.95, "c": 1.0}
    assert value(s, "spendgate_session_budget_usd", session="a") == 10
    assert value(s, "spendgate_session_spent_usd", session="a") == 9.5

    def broken() -> list[tuple[str, Decimal, Decimal]]:
        raise RuntimeError("ledger down")

    metrics.bind_gauges(lambda: 0, lambda: 0, lambda: 0, budgets=broken)
    assert not any(n == BUDGET_FAMILIES[0] for n, _ in registry_samples(registry))


# -- a real proxy, real SDKs, a real scrape -----------------------------------------------------


async def test_scrape_after_sdk_traffic_equals_the_traffic(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    await send_traffic(proxy, upstream)
    rows = await expected_rows(proxy)
    assert len(rows) == 4
    s = await scrape(proxy)

    statuses = Tally((r["route"], r["providerId"], r["modelId"], str(r["status"])) for r in rows)
    for (route, provider, model, status), n in statuses.items():
        assert (
            value(
                s,
                "spendgate_requests_total",
                route=route,
                provider=provider,
                model=model,
                status=status,
            )
            == n
        )
    assert total(s, "spendgate_requests_total") == 4  # the 402 never reached the upstream

    for key, field in (
        ("input", "inputTokens"),
        ("output", "outputTokens"),
        ("cached_input", "cachedInputTokens"),
        ("cache_write", "cacheWriteTokens"),
        ("reasoning", "reasoningTokens"),
    ):
        by_model: Tally[tuple[str, str]] = Tally()
        for r in rows:
            by_model[(r["providerId"], r["modelId"])] += r[field]
        for (provider, model), n in by_model.items():
            got = value(s, "spendgate_tokens_total", provider=provider, model=model, type=key)
            assert got == n, (key, model)
    assert (
        value(
            s,
            "spendgate_tokens_total",
            provider="openai",
            model="gpt-4o-mini-2024-07-18",
            type="input",
        )
        == 1149
    )
    assert (
        value(
            s,
            "spendgate_tokens_total",
            provider="anthropic",
            model="claude-3-5-sonnet-20240620",
            type="cache_write",
        )
        == 1165
    )

    costs = row_cost_totals(rows)
    assert costs[("openai", "gpt-4o-mini-2024-07-18")] == Decimal("0.00030735")
    for (provider, model), cost in costs.items():
        assert value(s, "spendgate_cost_usd_total", provider=provider, model=model) == float(cost)

    for (provider, model), n in Tally((r["providerId"], r["modelId"]) for r in rows).items():
        assert (
            value(s, "spendgate_request_duration_seconds_count", provider=provider, model=model)
            == n
        )
        assert (
            value(s, "spendgate_time_to_first_token_seconds_count", provider=provider, model=model)
            == n
        )

    assert value(s, "spendgate_upstream_errors_total", route="openai", kind="http_5xx") == 1
    assert (
        value(
            s, "spendgate_budget_rejections_total", route="openai", code="session_budget_exceeded"
        )
        == 1
    )
    assert value(s, "spendgate_active_streams") == 0
    assert value(s, "spendgate_paused_sessions") == 1
    assert value(s, "spendgate_event_subscribers") == 0

    ok = [r for r in rows if r["status"] < 400]
    assert total(s, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == len(ok)
    assert total(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == sum(
        r["outputTokens"] for r in ok
    )
    assert (
        value(
            s,
            "gen_ai_client_operation_duration_seconds_count",
            gen_ai_provider_name="anthropic",
            gen_ai_request_model="claude-3-5-sonnet-20240620",
            gen_ai_operation_name="chat",
        )
        == 1
    )
    assert (
        value(
            s,
            "gen_ai_client_token_usage_sum",
            gen_ai_provider_name="openai",
            gen_ai_request_model="gpt-4o-mini",
            gen_ai_operation_name="chat",
            gen_ai_token_type="input",
        )
        == 1149
    )

    # no session label anywhere but the budget gauges, and those only for "broke"
    for name, labels in s:
        if "session" in dict(labels):
            assert name in BUDGET_FAMILIES and dict(labels)["session"] == "broke", name
    assert value(s, "spendgate_session_budget_used_ratio", session="broke") == 1.0


async def test_session_labels_setting_from_the_environment(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_METRICS_SESSION_LABELS", "true")
    proxy = await start_proxy()
    upstream.queue(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"))
    async with oa(proxy, "agent-7") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    s = await scrape(proxy)
    m = {"provider": "openai", "model": "gpt-4o-mini-2024-07-18", "session": "agent-7"}
    assert value(s, "spendgate_requests_total", route="openai", status="200", **m) == 1
    assert value(s, "spendgate_tokens_total", type="output", **m) == 353
    assert value(s, "spendgate_cost_usd_total", **m) == 0.00030735


async def test_budget_ratio_follows_the_ledger(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"))
    async with oa(proxy, "run-9") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    s = await scrape(proxy)
    assert not any(n in BUDGET_FAMILIES for n, _ in s)  # no budget, no series
    async with proxy.http.put(proxy.url("/api/sessions/run-9/budget"), json={"budgetUsd": 0.001}):
        pass
    s = await scrape(proxy)
    assert value(s, "spendgate_session_budget_used_ratio", session="run-9") == float(
        Decimal("0.00030735") / Decimal("0.001")
    )
    assert value(s, "spendgate_session_budget_usd", session="run-9") == 0.001
    assert value(s, "spendgate_session_spent_usd", session="run-9") == 0.00030735


async def wait_gauge(proxy: Proxy, name: str, want: float) -> None:
    async def reached() -> bool:
        return value(await scrape(proxy), name) == want

    await eventually(reached)


async def test_live_gauges_active_streams_and_subscribers(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # the upstream takes a while between chunks, so the stream stays open to be seen
    upstream.queue(sse_reply([stream_chunk(c) for c in "abcd"], delay=0.25))
    async with EventsClient(proxy.http, proxy.url("/api/events")):
        await wait_gauge(proxy, "spendgate_event_subscribers", 1)
        async with oa(proxy, "run-1") as c:
            stream = await c.chat.completions.create(model="gpt-4o", messages=HI, stream=True)  # type: ignore[arg-type]
            await wait_gauge(proxy, "spendgate_active_streams", 1)
            got = [ch.choices[0].delta.content or "" async for ch in stream]  # type: ignore[union-attr]
            assert "".join(got) == "abcd"
        await wait_gauge(proxy, "spendgate_active_streams", 0)
    await wait_gauge(proxy, "spendgate_event_subscribers", 0)


async def test_a_failing_metric_never_breaks_forwarding(
    proxy: Proxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("metrics are down")

    monkeypatch.setattr(proxy.metrics, "record", explode)
    upstream.queue(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"))
    async with oa(proxy, "run-1") as c:
        resp = await c.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    assert resp.usage is not None and resp.usage.completion_tokens == 353
    (row,) = await proxy.messages("run-1")
    assert row["outputTokens"] == 353


def test_unmetered_tokens_are_counted_and_counters_never_go_down() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(message(model=None, endpoint="other", output_tokens=0), "other", None)
    s = registry_samples(registry)
    unknown = {"provider": "openai", "model": "unknown"}
    assert value(s, "spendgate_tokens_total", type="input", **unknown) == 1200
    assert value(s, "spendgate_tokens_total", type="output", **unknown) is None
    with pytest.raises(ValueError, match="only go up"):
        metrics.record(message(cost_usd=Decimal("-0.01")), "chat", "gpt-4o")
    with pytest.raises(ValueError, match="only go up"):
        metrics.record(message(output_tokens=-1), "chat", "gpt-4o")


def test_error_response_series_start_at_their_first_error_response() -> None:
    """A status's http_5xx series is made when an error response of it is first counted: a
    transport failure (``error`` set; the proxy counts it by its kind) leaves none behind."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record(message(status=504, error="timeout", cost_usd=None), "chat", "gpt-4o")
    names = {name for name, _ in registry_samples(registry)}
    assert "spendgate_upstream_errors_total" not in names
    for _ in range(2):  # the same series (route, model, status...) as the transport failure
        metrics.record(message(status=504, cost_usd=None), "chat", "gpt-4o")
    metrics.record(message(route="groq", status=503, cost_usd=None), "chat", "gpt-4o")
    s = registry_samples(registry)
    assert value(s, "spendgate_upstream_errors_total", route="openai", kind="http_5xx") == 2
    assert value(s, "spendgate_upstream_errors_total", route="groq", kind="http_5xx") == 1
    assert total(s, "spendgate_upstream_errors_total") == 3


# -- bounded model labels (issue #16) ------------------------------------------------------


def capped(
    max_models: int, aliases: dict[str, str] | None = None
) -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_models=max_models)
    metrics.bind_prices(load_price_table(None, aliases))
    return metrics, registry


def models_of(s: Samples, name: str, label: str = "model") -> set[str]:
    return {dict(ls)[label] for n, ls in s if n == name}


def test_models_past_the_cap_are_other_and_every_sum_stays_exact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics, registry = capped(max_models=20)
    rng = random.Random(16)
    sent: list[MessageRecord] = []
    names = [f"client-model-{i}" for i in range(500)]
    known = ["gpt-4o", "claude-sonnet-4-5", "gpt-4o-mini"]
    for i, name in enumerate(names):
        if i % 100 == 99:  # known models, also long after the cap was reached
            name = known[i // 100 % len(known)]
        rec = message(
            id=f"msg_{i}",
            model=name,
            input_tokens=rng.randrange(5000),
            output_tokens=rng.randrange(5000),
            cached_input_tokens=0,
            reasoning_tokens=0,
            cost_usd=None if rng.random() < 0.2 else Decimal(rng.randrange(10**6)) / 10**9,
            status=rng.choice((200, 200, 200, 500)),
        )
        metrics.record(rec, "chat", name)
        sent.append(rec)
    s = registry_samples(registry)
    first_20 = set(names[:20])
    used_known = {m.model for m in sent} & set(known)
    assert used_known == set(known)
    # counters: the price table's models, the first 20 others, then "other"
    for family in ("spendgate_requests_total", "spendgate_tokens_total"):
        assert models_of(s, family) == first_20 | used_known | {"other"}
    # histograms (a value costs them 17-34 series): a tenth of the cap
    hist = set(names[:2]) | used_known | {"other"}
    assert models_of(s, "spendgate_request_duration_seconds_count") == hist
    assert models_of(s, "spendgate_time_to_first_token_seconds_count") == hist
    genai = "gen_ai_client_operation_duration_seconds_count"
    assert models_of(s, genai, "gen_ai_request_model") == hist
    # folding into "other" loses nothing: the sums over all values are the traffic's
    assert total(s, "spendgate_requests_total") == len(sent)
    assert total(s, "spendgate_tokens_total", type="input") == sum(m.input_tokens for m in sent)
    assert total(s, "spendgate_tokens_total", type="output") == sum(m.output_tokens for m in sent)
    assert total(s, "spendgate_unpriced_responses_total") == sum(m.cost_usd is None for m in sent)
    assert total(s, "spendgate_request_duration_seconds_count") == len(sent)
    assert total(s, genai) == len(sent)
    ok = [m for m in sent if m.status < 400]
    assert total(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == sum(
        m.input_tokens for m in ok
    )
    errors = sum(m.status >= 500 for m in sent)
    assert total(s, "spendgate_upstream_errors_total", kind="http_5xx") == errors
    # cost: the Decimal cells sum to the rows' costs exactly
    cells = sum((cell[0] for cell in metrics.cost.cells.values()), Decimal(0))
    assert cells == sum((m.cost_usd for m in sent if m.cost_usd is not None), Decimal(0))
    # known models keep their own values, with exactly their own traffic
    for model in known:
        mine = [m for m in sent if m.model == model]
        assert total(s, "spendgate_requests_total", model=model) == len(mine)
        assert total(s, "spendgate_tokens_total", model=model, type="input") == sum(
            m.input_tokens for m in mine
        )
    said = [r for r in caplog.records if "SPENDGATE_METRICS_MAX_MODELS" in r.getMessage()]
    assert len(said) == 1  # logged once, when the first name is folded


def test_only_names_the_table_holds_itself_are_known() -> None:
    """A prefix or a date suffix that pricing drops could be varied without end, so such a
    name counts against the cap; an exact id, ``provider/id`` and an alias do not."""
    metrics, registry = capped(max_models=1, aliases={"house-model": "gpt-4o"})
    for model, provider in (
        ("gpt-4o-2099-01-01", "openai"),  # priced by dropping the date: the 1 other
        ("anything/gpt-4o", "openai"),  # priced by dropping the prefix: past the cap
        ("gpt-4o-2099-01-02", "openai"),
        ("house-model", "openai"),  # an alias
        ("llama3", "ollama"),  # ollama/llama3 in the table
        ("gpt-4o", "openai"),
    ):
        metrics.record(message(model=model, provider=provider), "chat", model)
    s = registry_samples(registry)
    assert models_of(s, "spendgate_requests_total") == {
        "gpt-4o-2099-01-01", "other", "house-model", "llama3", "gpt-4o",
    }  # fmt: skip
    assert value(s, "spendgate_requests_total", route="openai", provider="openai",
                 model="other", status="200") == 2  # fmt: skip
    assert models_of(s, "spendgate_request_duration_seconds_count") == {
        "other", "house-model", "llama3", "gpt-4o",
    }  # fmt: skip


def test_a_zero_cap_leaves_only_the_price_tables_models() -> None:
    metrics, registry = capped(max_models=0)
    for model in ("mine", "gpt-4o", "yours", None):
        metrics.record(message(model=model), "chat", model)
    s = registry_samples(registry)
    assert models_of(s, "spendgate_requests_total") == {"other", "gpt-4o", "unknown"}
    assert (
        value(s, "spendgate_tokens_total", provider="openai", model="other", type="input") == 2400
    )


def test_the_series_cache_stays_bounded() -> None:
    metrics, registry = capped(max_models=100)
    for i in range(20_000):
        name = f"m{i}"
        metrics.record(message(model=name, cost_usd=None), "chat", name)
    # one entry per admitted name, and one for all of "other" (not one per name)
    assert len(metrics._series) <= 101 + 1
    # session labels multiply the keys: the cache is cleared when full, counts stay exact
    registry = CollectorRegistry()
    metrics = Metrics(registry, session_labels=True)
    n = SERIES_CACHE_LIMIT + 2000
    for i in range(n):
        metrics.record(message(session_id=f"s{i}"), "chat", "gpt-4o")
        assert len(metrics._series) <= SERIES_CACHE_LIMIT
    assert total(registry_samples(registry), "spendgate_requests_total") == n


async def test_the_cap_through_the_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_METRICS_MAX_MODELS", "2")
    proxy = await start_proxy()
    assert proxy.settings.metrics_max_models == 2
    names = ["one", "two", "three", "gpt-4o-mini", "four", "five"]
    for name in names:
        usage = {"prompt_tokens": 10, "completion_tokens": len(name), "total_tokens": 99}
        upstream.queue(json_reply({"object": "chat.completion", "model": name, "usage": usage}))
        async with proxy.http.post(
            proxy.url("/s/card/openai/v1/chat/completions"), json={"model": name, "messages": HI}
        ) as r:
            assert r.status == 200
    rows = await proxy.messages("card")
    assert sorted(r["modelId"] for r in rows) == sorted(names)
    s = await scrape(proxy)
    assert models_of(s, "spendgate_requests_total") == {"one", "two", "gpt-4o-mini", "other"}
    assert value(s, "spendgate_tokens_total", provider="openai", model="other", type="output") == (
        len("three") + len("four") + len("five")
    )
    assert total(s, "spendgate_requests_total") == len(rows)
    for key, field in (("input", "inputTokens"), ("output", "outputTokens")):
        assert total(s, "spendgate_tokens_total", type=key) == sum(r[field] for r in rows)
    # the known model keeps its value and its price
    assert value(s, "spendgate_cost_usd_total", provider="openai", model="gpt-4o-mini") == float(
        sum(Decimal(str(r["costUsd"])) for r in rows if r["modelId"] == "gpt-4o-mini")
    )


def test_the_cap_setting_is_validated() -> None:
    assert Settings().metrics_max_models == 100
    with pytest.raises(ValidationError):
        Settings(metrics_max_models=-1)


def test_the_cardinality_bench_runs_against_spendgate_serve() -> None:
    """bench/metrics_cardinality.py on a tiny load (no timing asserted): the real process
    caps the labels and its sums over all values equal the traffic."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.metrics_cardinality", "--models", "150", "--scrapes", "2",
         "--max-models", "20"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| 20 |" in proc.stdout and "| yes |" in proc.stdout
    assert "`spendgate_requests` 24," in proc.stdout  # 3 known, 20 others, other
    assert "`spendgate_request_duration_seconds` 6," in proc.stdout  # 3 known, 2, other
