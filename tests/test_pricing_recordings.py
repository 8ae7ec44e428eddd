"""Every recording's cost through the running proxy, against an independent calculation.

The calculation here is written from the providers' published pricing rules and list
prices (USD per million tokens), not from spendgate's table or cost function: OpenAI
bills uncached prompt tokens, cached ones and completion tokens (reasoning included)
at the tier the response names, plus $10 per 1,000 web search calls
(platform.openai.com/docs/pricing); Anthropic bills ``input_tokens``, cache reads,
cache writes and output, plus $10 per 1,000 web searches
(docs.anthropic.com/en/docs/about-claude/pricing); Gemini bills the prompt (tool-use
prompt tokens included) less cached tokens, cached tokens, and candidates plus thoughts
(ai.google.dev/gemini-api/docs/pricing); Ollama runs on your machine ($0); OpenRouter
reports what it charged in ``usage.cost``, and that is the row's cost. Azure's global
list price for gpt-5-nano is OpenAI's.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NamedTuple

import pytest

from tests.conftest import StartProxy
from tests.helpers.recordings import CASES, EXTRAS, Case, through_proxy
from tests.upstream import FakeUpstream

D = Decimal


class Rates(NamedTuple):
    """Published USD per million tokens."""

    input: str
    output: str
    cached: str | None = None
    cache_write: str | None = None


PUBLISHED = {
    # OpenAI (standard tier)
    "gpt-4-0613": Rates("30", "60"),
    "gpt-4o-mini-2024-07-18": Rates("0.15", "0.6", "0.075"),
    "gpt-5-nano-2025-08-07": Rates("0.05", "0.4", "0.005"),
    "gpt-3.5-turbo-0125": Rates("0.5", "1.5"),
    "gpt-4.1-nano-2025-04-14": Rates("0.1", "0.4", "0.025"),
    "gpt-4o-2024-08-06": Rates("2.5", "10", "1.25"),
    "gpt-5-2025-08-07": Rates("1.25", "10", "0.125"),
    # Anthropic (5-minute cache writes)
    "claude-3-5-sonnet-20240620": Rates("3", "15", "0.3", "3.75"),
    "claude-sonnet-4-20250514": Rates("3", "15", "0.3", "3.75"),
    "claude-sonnet-4-6": Rates("3", "15", "0.3", "3.75"),
    # Gemini API (prompts up to 200k)
    "gemini-2.5-flash": Rates("0.3", "2.5", "0.03"),
    "gemini-3-pro-preview": Rates("2", "12", "0.2"),
}
FLEX = {"gpt-5-2025-08-07": Rates("0.625", "5", "0.0625")}
"""OpenAI's Flex processing prices."""
WEB_SEARCH = D("0.01")
"""OpenAI's web_search tool and Anthropic's web search: $10 per 1,000 calls."""
OPENROUTER_COST = D("0.00333825")
"""What OpenRouter says it charged (its ``usage.cost``)."""
UNPRICED_BY_DESIGN = {
    # Google's experimental model has no published price
    "gemini/stream_gemini-2.0-flash-exp.sse",
}


def published_cost(case: Case) -> Decimal | None:
    """The cost from the providers' rules, on the recording's raw usage numbers."""
    raw, model = case.entry["expected"], case.entry["response_model"]
    api = case.entry["api"]
    extras = EXTRAS.get(case.name)
    if case.name.startswith("ollama/"):
        return D(0)
    if case.name.startswith("openai_compatible/"):
        return OPENROUTER_COST
    if extras is not None and extras.service_tier == "flex":
        rates = FLEX[model]
    else:
        rates = PUBLISHED[model]
    inp, out = raw["input_tokens"], raw["output_tokens"]
    cached = raw["cached_input_tokens"] or 0
    per = D(1_000_000)
    if api.startswith("anthropic."):
        write = raw["cache_creation_input_tokens"] or 0
        usd = (
            inp * D(rates.input)
            + cached * D(rates.cached or rates.input)
            + write * D(rates.cache_write or rates.input)
            + out * D(rates.output)
        ) / per
    elif api.startswith(("gemini.", "vertexai.")):
        thoughts = raw["reasoning_tokens"] or 0
        tool_use = raw["total_tokens"] - inp - out - thoughts  # not in the manifest
        prompt = inp + tool_use
        usd = (
            (prompt - cached) * D(rates.input)
            + cached * D(rates.cached or rates.input)
            + (out + thoughts) * D(rates.output)
        ) / per
    else:  # OpenAI: prompt and completion counts include cached and reasoning tokens
        usd = (
            (inp - cached) * D(rates.input)
            + cached * D(rates.cached or rates.input)
            + out * D(rates.output)
        ) / per
    searches = dict(extras.tool_calls).get("web_search", 0) if extras is not None else 0
    return usd + searches * WEB_SEARCH


PRICED = [
    c
    for c in CASES
    if c.entry["expected"]["input_tokens"] is not None and c.name not in UNPRICED_BY_DESIGN
]


def test_the_issue_figures_hold_in_the_calculation() -> None:
    """The independent calculation gives the issue's figures for its recordings."""
    by_name = {c.name: c for c in PRICED}
    assert published_cost(by_name["openai/responses_stream_reasoning_gpt-5.sse"]) == D(
        "0.002378125"
    )
    assert published_cost(by_name["openai/responses_stream_websearch_cached_gpt-5.sse"]) == D(
        "0.01828875"
    )


@pytest.mark.parametrize("case", PRICED, ids=lambda c: c.name)
async def test_recording_cost_matches_the_published_rules(
    case: Case, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    row, _ = await through_proxy(case, start_proxy, upstream)
    expected = published_cost(case)
    assert expected is not None
    assert row["costUsd"] == pytest.approx(float(expected), rel=1e-12, abs=1e-15), row
    assert row["estimated"] is False
    check_how_priced(case, row)


def check_how_priced(case: Case, row: dict[str, Any]) -> None:
    extras = EXTRAS.get(case.name)
    assert row["serviceTier"] == (extras.service_tier if extras else None)
    if case.name.startswith("ollama/"):
        # the route's own $0 listing (ollama/llama3), else the local rule
        assert row["priceSource"] in ("local", "bundled 2026-11-22"), row
        return
    if case.name.startswith("openai_compatible/"):
        # OpenRouter's own figure wins; the table's stays beside it: its listing of
        # x-ai/grok-4 has no cache-read price, so it bills the 679 cached tokens at the
        # full $3 (687 x $3 + 187 x $15 = $0.004866) where xAI's $0.75 gives OpenRouter's
        assert row["priceSource"] == "provider"
        assert row["pricedAs"] is not None and "grok-4" in row["pricedAs"]
        assert row["tableCostUsd"] == pytest.approx(0.004866)
        return
    assert row["priceSource"].startswith(("bundled ", "overrides "))
    assert row["pricedAs"]
    assert row["tableCostUsd"] == row["costUsd"]
    searches = dict(extras.tool_calls).get("web_search", 0) if extras else 0
    assert row["toolCostUsd"] == pytest.approx(float(searches * WEB_SEARCH))
