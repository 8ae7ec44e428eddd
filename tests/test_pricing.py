"""Pricing (docs/reference.md §4): model-id resolution and exact Decimal costs."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.price_files import bundled_date, load_price_table
from spendgate.pricing import (
    ModelPrice,
    PriceTable,
    PriceTier,
    PricingError,
    model_price,
    per_million,
)
from spendgate.routing import build_routes
from spendgate.settings import RouteConfig, Settings
from spendgate.usage import Extras, TokenCounts, Usage
from tests.helpers.prices import found
from tests.paths import PRICE_DATA

D = Decimal


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def small_table(aliases: dict[str, str] | None = None) -> PriceTable:
    """A hand-made table, so each resolution rule is tested on its own."""
    prices = {
        m: ModelPrice(model=m, input=D(1), output=D(2))
        for m in ("gpt-4o", "claude-3-5-sonnet", "gpt-4", "ollama/llama3", "xai/grok-4", "grok-4")
    }
    return PriceTable(prices, aliases)


# --- resolution ---------------------------------------------------------------------


def test_resolve_exact(table: PriceTable) -> None:
    price = table.resolve("gpt-4o-2024-08-06")
    assert price is not None and price.model == "gpt-4o-2024-08-06"


def test_resolve_exact_tries_provider_prefixed_key_first() -> None:
    t = small_table()
    assert found(t, "grok-4", "xai").model == "xai/grok-4"
    assert found(t, "grok-4").model == "grok-4"


@pytest.mark.parametrize(
    ("model", "expected"),
    [("openai/gpt-4o", "gpt-4o"), ("models/gpt-4o", "gpt-4o"), ("a/b/gpt-4o", "gpt-4o")],
)
def test_resolve_without_provider_prefix(model: str, expected: str) -> None:
    assert found(small_table(), model).model == expected


def test_resolve_gemini_models_prefix_on_bundled(table: PriceTable) -> None:
    price = table.resolve("models/gemini-2.5-flash", "gemini")
    assert price is not None and price.model == "gemini-2.5-flash"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet"),
        ("gpt-4-0613", "gpt-4"),
        ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
        ("openai/gpt-4o-2024-08-06", "gpt-4o"),
    ],
)
def test_resolve_without_date_suffix(model: str, expected: str) -> None:
    assert found(small_table(), model).model == expected


def test_resolve_ollama_tags() -> None:
    t = small_table()
    assert found(t, "llama3:latest", "ollama").model == "ollama/llama3"
    assert found(t, "llama3:8b", "ollama").model == "ollama/llama3"


def test_resolve_vertex_style_prefers_the_dated_first_party_id(table: PriceTable) -> None:
    price = table.resolve("claude-3-5-sonnet@20240620")
    assert price is not None and price.model == "claude-3-5-sonnet-20240620"


def test_resolve_fine_tuned_openai_model(table: PriceTable) -> None:
    price = table.resolve("ft:gpt-4o-mini-2024-07-18:acme::9xYz")
    assert price is not None and price.model == "ft:gpt-4o-mini-2024-07-18"


def test_resolve_alias_last() -> None:
    t = small_table({"my-model": "gpt-4o-2024-08-06", "gpt-4": "gpt-4o"})
    assert found(t, "my-model").model == "gpt-4o"
    assert found(t, "openai/my-model").model == "gpt-4o"
    # Aliases come after the exact id: a real entry is never shadowed.
    assert found(t, "gpt-4").model == "gpt-4"


def test_bundled_anthropic_aliases(table: PriceTable) -> None:
    price = table.resolve("claude-sonnet-4-0")
    assert price is not None and price.model == "claude-sonnet-4-20250514"


def test_resolution_is_cached_including_misses() -> None:
    t = small_table()
    assert t.resolve("nope-1") is None
    assert t.resolve("gpt-4o-2024-08-06") is t.resolve("gpt-4o-2024-08-06")
    assert t._cache[("nope-1", None)] is None
    assert t._cache[("gpt-4o-2024-08-06", None)] is t.get("gpt-4o")


def test_unknown_model_costs_none_but_tokens_still_count(
    table: PriceTable, caplog: pytest.LogCaptureFixture
) -> None:
    usage = Usage(input_tokens=1200, output_tokens=300)
    t = load_price_table()
    with caplog.at_level(logging.WARNING, logger="spendgate.pricing"):
        assert t.resolve("acme-llm-9000") is None
        assert t.cost("acme-llm-9000", usage.counts()) is None
        assert t.cost("acme-llm-9000", usage.counts()) is None
        assert t.reserve_cost("acme-llm-9000", 1000, 4096) is None
    assert usage.counts().total_tokens == 1500
    warnings = [r for r in caplog.records if "acme-llm-9000" in r.getMessage()]
    assert len(warnings) == 1  # once per model, not per request


def test_entry_without_token_prices_costs_none() -> None:
    t = PriceTable({"half": ModelPrice(model="half", input=D(1))})
    assert t.cost("half", TokenCounts(input_tokens=10)) is None


# --- costs, exact to the Decimal -------------------------------------------------------


def test_cost_openai_gpt_4o_mini_with_cache(table: PriceTable) -> None:
    # input 0.15, cached 0.075, output 0.6 per million
    counts = TokenCounts(input_tokens=1149, cached_input_tokens=1024, output_tokens=353)
    # (125 x 0.15 + 1024 x 0.075 + 353 x 0.6) / 1e6 = (18.75 + 76.8 + 211.8) / 1e6
    assert table.cost("gpt-4o-mini", counts) == D("0.00030735")
    assert table.cost("gpt-4o-mini-2024-07-18", counts, "openai") == D("0.00030735")


def test_cost_gpt_5_nano_reasoning_billed_once(table: PriceTable) -> None:
    # input 0.05, output 0.4 per million; the 192 reasoning tokens are inside the 228
    counts = TokenCounts(input_tokens=34, output_tokens=228, reasoning_tokens=192)
    # (34 x 0.05 + 228 x 0.4) / 1e6 = (1.7 + 91.2) / 1e6
    assert table.cost("gpt-5-nano", counts) == D("0.0000929")


def test_cost_anthropic_sonnet_4_6_cache_reads_and_writes(table: PriceTable) -> None:
    # input 3, output 15, cache read 0.3, 5-minute write 3.75, 1-hour write 6 per million.
    # Anthropic usage: input_tokens 12, cache_read 4000, cache_creation 2500 (1000 of them
    # 1h), output 350 -> spendgate input_tokens = 12 + 4000 + 2500 = 6512.
    counts = TokenCounts(
        input_tokens=6512,
        cached_input_tokens=4000,
        cache_write_tokens=2500,
        cache_write_1h_tokens=1000,
        output_tokens=350,
    )
    # (12 x 3 + 4000 x 0.3 + 1500 x 3.75 + 1000 x 6 + 350 x 15) / 1e6
    # = (36 + 1200 + 5625 + 6000 + 5250) / 1e6
    assert table.cost("claude-sonnet-4-6", counts) == D("0.018111")


def test_cost_claude_3_5_sonnet_20240620_derived_from_bedrock(table: PriceTable) -> None:
    # input 3, output 15, cache read 0.3, 5m write 3.75, 1h write 6 (2 x input) per million
    five_min = TokenCounts(
        input_tokens=3100, cached_input_tokens=2000, cache_write_tokens=1000, output_tokens=200
    )
    # (100 x 3 + 2000 x 0.3 + 1000 x 3.75 + 200 x 15) / 1e6 = (300 + 600 + 3750 + 3000) / 1e6
    assert table.cost("claude-3-5-sonnet-20240620", five_min) == D("0.00765")
    one_hour = TokenCounts(
        input_tokens=3100,
        cached_input_tokens=2000,
        cache_write_tokens=1000,
        cache_write_1h_tokens=400,
        output_tokens=200,
    )
    # (300 + 600 + 600 x 3.75 + 400 x 6 + 3000) / 1e6 = (300 + 600 + 2250 + 2400 + 3000) / 1e6
    assert table.cost("claude-3-5-sonnet-20240620", one_hour) == D("0.00855")


def test_cost_gemini_2_5_flash_thoughts_inside_output(table: PriceTable) -> None:
    # input 0.3, cached 0.03, output 2.5 per million. promptTokenCount 5000 incl. 2048
    # cached; candidates 300 + thoughts 700 = output 1000.
    counts = TokenCounts(
        input_tokens=5000, cached_input_tokens=2048, output_tokens=1000, reasoning_tokens=700
    )
    # (2952 x 0.3 + 2048 x 0.03 + 1000 x 2.5) / 1e6 = (885.6 + 61.44 + 2500) / 1e6
    assert table.cost("gemini-2.5-flash", counts, "gemini") == D("0.00344704")


def test_cost_gemini_2_5_pro_above_200k_tier(table: PriceTable) -> None:
    # base: input 1.25, cached 0.125, output 10; above 200k: 2.5, 0.25, 15 per million
    big = TokenCounts(input_tokens=250_000, cached_input_tokens=100_000, output_tokens=2000)
    # (150000 x 2.5 + 100000 x 0.25 + 2000 x 15) / 1e6 = (375000 + 25000 + 30000) / 1e6
    assert table.cost("gemini-2.5-pro", big) == D("0.43")
    at_threshold = TokenCounts(input_tokens=200_000, output_tokens=2000)
    # not above 200k: (200000 x 1.25 + 2000 x 10) / 1e6 = (250000 + 20000) / 1e6
    assert table.cost("gemini-2.5-pro", at_threshold) == D("0.27")


def test_cost_highest_tier_wins_and_missing_tier_fields_fall_back() -> None:
    price = ModelPrice(
        model="m",
        input=D(1),
        output=D(2),
        cached_input=D("0.1"),
        tiers=(PriceTier(100, input=D(3)), PriceTier(1000, input=D(5), output=D(7))),
    )
    # 2000 > 1000: input 5, output 7, cached from base 0.1:
    # (1000 x 5 + 1000 x 0.1 + 10 x 7) / 1e6 = 5170 / 1e6
    counts = TokenCounts(input_tokens=2000, cached_input_tokens=1000, output_tokens=10)
    assert price.cost(counts) == D("0.00517")
    # 500 > 100 only: input 3, output from base 2: (500 x 3 + 10 x 2) / 1e6
    assert price.cost(TokenCounts(input_tokens=500, output_tokens=10)) == D("0.00152")


def test_cost_cache_prices_fall_back() -> None:
    # no cached/cache-write prices: reads and writes at input; 1h writes at cache_write
    price = ModelPrice(model="m", input=D(2), output=D(4))
    counts = TokenCounts(
        input_tokens=100, cached_input_tokens=30, cache_write_tokens=20, cache_write_1h_tokens=5
    )
    assert price.cost(counts) == D("0.0002")  # 100 x 2 / 1e6
    with_write = ModelPrice(model="m", input=D(2), output=D(4), cache_write=D("2.5"))
    # (50 x 2 + 30 x 2 + 15 x 2.5 + 5 x 2.5) / 1e6 = (100 + 60 + 37.5 + 12.5) / 1e6
    assert with_write.cost(counts) == D("0.00021")


def test_reserve_cost(table: PriceTable) -> None:
    # gpt-4o: input 2.5, output 10: (1000 x 2.5 + 4096 x 10) / 1e6 = (2500 + 40960) / 1e6
    assert table.reserve_cost("gpt-4o", 1000, 4096) == D("0.04346")


def test_price_to_json(table: PriceTable) -> None:
    doc = found(table, "gemini-2.5-pro").to_json()
    assert doc["input"] == 1.25 and doc["cachedInput"] == 0.125 and doc["source"] == "bundled"
    assert doc["tiers"] == [
        {
            "aboveInputTokens": 200000,
            "input": 2.5,
            "output": 15.0,
            "cachedInput": 0.25,
            "cacheWrite": None,
            "cacheWrite1h": None,
        }
    ]
    assert doc["contextWindow"] == 1048576 and doc["maxOutputTokens"] == 65536
    json.dumps([p.to_json() for p in table])  # GET /api/pricing: every entry is JSON


def test_per_million_is_exact() -> None:
    assert per_million(2.5e-06) == D("2.5") and str(per_million(2.5e-06)) == "2.5"
    assert str(per_million(1.25e-07)) == "0.125"
    assert str(per_million(1.5e-05)) == "15"
    assert str(per_million(1e-4)) == "100"
    assert per_million("abc") is None and per_million(None) is None


# --- resolution across providers (issue #18) ---------------------------------------------


@pytest.fixture(scope="module")
def public() -> PriceTable:
    """The whole public table, as `spendgate pricing update` stores it."""
    return load_price_table(PRICE_DATA)


COUNTS = TokenCounts(input_tokens=1000, output_tokens=500)


@pytest.mark.parametrize(
    ("model", "provider", "entry", "cost"),
    [
        # only vertex_ai/… lists it: input 2, output 12 → (1000 x 2 + 500 x 12) / 1e6
        ("gemini-3-pro-preview", "gemini", "vertex_ai/gemini-3-pro-preview", "0.008"),
        ("models/gemini-3-pro-preview", "gemini", "vertex_ai/gemini-3-pro-preview", "0.008"),
        # only Vertex lists it, as claude-3-haiku@20240307: 0.25, 1.25 → (250 + 625) / 1e6
        ("claude-3-haiku-20240307", "anthropic", "vertex_ai/claude-3-haiku@20240307", "0.000875"),
        # Azure's own name: azure/gpt-35-turbo, 0.5, 1.5 → (500 + 750) / 1e6
        ("gpt-35-turbo", "azure", "azure/gpt-35-turbo", "0.00125"),
        ("gpt-35-turbo", "my-azure", "azure/gpt-35-turbo", "0.00125"),
    ],
)
def test_a_model_listed_only_under_another_prefix(
    public: PriceTable, model: str, provider: str, entry: str, cost: str
) -> None:
    price = public.priced(model, provider)
    assert price is not None and price.priced_as == entry
    assert price.cost(COUNTS) == D(cost)


@pytest.mark.parametrize("provider", ["xai", "grok", "openai", "my-box", None])
def test_route_names_do_not_matter(table: PriceTable, provider: str | None) -> None:
    # grok-4.7: xai/grok-4.7, input 2, output 6 → (1000 x 2 + 500 x 6) / 1e6, on any route
    price = table.priced("grok-4.7", provider)
    assert price is not None and price.priced_as == "xai/grok-4.7"
    assert price.cost(COUNTS) == D("0.005")


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("x-ai/grok-4.7", "xai/grok-4.7"),  # OpenRouter's vendor slug, xAI's own entry
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),  # dots for dashes: first party
        ("mistralai/codestral-2508", "mistral/codestral-2508"),
        ("deepseek/deepseek-chat", "deepseek/deepseek-chat"),
        ("google/gemini-2.5-flash", "gemini-2.5-flash"),
    ],
)
def test_openrouter_ids(table: PriceTable, model: str, entry: str) -> None:
    price = table.priced(model, "openrouter")
    assert price is not None and price.priced_as == entry


def test_openrouter_ids_on_the_whole_public_table(public: PriceTable) -> None:
    # a gateway's entry spelled with the dots (gmi/anthropic/claude-sonnet-4.5) never
    # beats the first-party one spelled with dashes
    assert found(public, "anthropic/claude-sonnet-4.5", "openrouter").model == "claude-sonnet-4-5"
    assert found(public, "x-ai/grok-4.7", "openrouter").model == "xai/grok-4.7"
    assert found(public, "google/gemini-3-pro-preview").model == "vertex_ai/gemini-3-pro-preview"


def p(model: str, inp: str | int, out: str | int, source: str = "bundled") -> ModelPrice:
    return ModelPrice(model=model, input=D(inp), output=D(out), source=source)


def table_of(*prices: ModelPrice) -> PriceTable:
    return PriceTable({x.model: x for x in prices})


def test_first_party_entry_wins_over_other_prefixes() -> None:
    t = table_of(p("vertex_ai/m-1-5", 9, 9), p("m-1-5", 1, 2), p("azure/m-1-5", 8, 8))
    assert found(t, "m-1-5").model == "m-1-5"
    assert found(t, "m-1.5").model == "m-1-5"  # spelled with a dot: still first party
    assert found(t, "m-1-5", "azure").model == "azure/m-1-5"  # the route's own listing first


def test_other_prefixes_in_the_documented_order() -> None:
    entries = ["zeta/m", "aaa/m", "openrouter/m", "azure_ai/m", "bedrock/m", "azure/m"]
    t = table_of(*(p(k, 1, 1) for k in [*entries, "vertex_ai/m", "xai/m"]))
    assert found(t, "m").model == "xai/m"
    order = []
    while len(t):
        first = found(t, "m").model
        order.append(first)
        t = table_of(*(x for x in t if x.model != first))
        if first == "zeta/m":
            break
    order_expected = [
        "xai/m", "vertex_ai/m", "azure/m", "bedrock/m", "azure_ai/m", "openrouter/m",
        "aaa/m", "zeta/m",
    ]  # fmt: skip
    assert order == order_expected


def test_the_routes_provider_listing_comes_first_among_other_prefixes() -> None:
    t = table_of(p("deepinfra/meta/m", 1, 1), p("together_ai/meta/m", 2, 2))
    assert found(t, "meta/m").model == "deepinfra/meta/m"
    assert found(t, "meta/m", "together").model == "together_ai/meta/m"


def test_bedrock_ids_name_their_model() -> None:
    t = table_of(p("anthropic.claude-x-20250101-v1:0", 3, 15))
    assert found(t, "claude-x-20250101").model == "anthropic.claude-x-20250101-v1:0"


def test_gemini_exp_1206_the_priced_entry_not_the_free_one(
    table: PriceTable, public: PriceTable
) -> None:
    # gemini/gemini-exp-1206 is $0, gemini-exp-1206 $0.30 / $2.50: the priced one
    for t in (table, public):
        price = t.priced("gemini-exp-1206", "gemini")
        assert price is not None and (price.input, price.output) == (D("0.3"), D("2.5"))


def test_a_free_duplicate_never_wins_over_a_priced_one() -> None:
    t = table_of(p("gemini/m", 0, 0), p("m", "0.3", "2.5"))
    assert found(t, "m", "gemini").model == "m"
    # a free entry alone is taken (the Gemini API's free Gemma is $0)
    assert found(table_of(p("m", 0, 0)), "m").free


def test_another_providers_free_listing_is_no_price() -> None:
    # ollama/llama3.2 at $0 says nothing about what a hosted llama3.2 costs
    t = table_of(p("ollama/llama3.2", 0, 0), p("ollama/m", 0, 0), p("groq/m", 1, 1))
    assert t.priced("llama3.2", "groq") is None
    assert found(t, "m", "other").model == "groq/m"


def test_your_own_free_entry_is_taken_as_written() -> None:
    t = table_of(p("gemini/m", 0, 0, "/home/me/pricing.toml"), p("m", 1, 1))
    assert found(t, "m", "gemini").model == "gemini/m"


# --- local routes ---------------------------------------------------------------------------


def test_a_local_routes_model_costs_nothing(table: PriceTable) -> None:
    price = table.priced("llama3.2", "ollama", local=True)
    assert price is not None and price.cost(COUNTS) == 0
    assert (price.priced_as, price.price_source) == ("llama3.2", "local")
    assert table.priced("llama3.2", "ollama") is None  # not a local route: no price


def test_a_local_route_ignores_other_providers_prices(table: PriceTable) -> None:
    price = table.priced("grok-4.7", "my-box", local=True)
    assert price is not None and price.source == "local" and price.cost(COUNTS) == 0


def test_a_price_entry_overrides_local(tmp_path: Path) -> None:
    mine = tmp_path / "pricing.toml"
    mine.write_text('[models."ollama/llama3.2"]\ninput = 0.01\noutput = 0.02\n')
    t = load_price_table(mine)
    price = t.priced("llama3.2:latest", "ollama", local=True)
    # (1000 x 0.01 + 500 x 0.02) / 1e6
    assert price is not None and price.cost(COUNTS) == D("0.00002")
    assert price.priced_as == "ollama/llama3.2" and price.price_source == f"file {mine}"


def test_local_flag_of_routes() -> None:
    settings = Settings(
        routes=[
            RouteConfig(prefix="/box", upstream="http://127.0.0.1:8080", local=True),
            RouteConfig(prefix="/cloud", upstream="https://ollama.com", adapter="ollama",
                        local=False),
            RouteConfig(prefix="/groq", upstream="https://api.groq.com/openai"),
        ]
    )  # fmt: skip
    local = {r.name: r.local for r in build_routes(settings)}
    assert local == {
        "box": True, "cloud": False, "groq": False,
        "ollama": True, "openai": False, "anthropic": False, "gemini": False,
    }  # fmt: skip


# --- pricedAs and priceSource ----------------------------------------------------------------


def test_every_resolution_says_which_entry_and_source(table: PriceTable, tmp_path: Path) -> None:
    price = found(table, "openai/gpt-4o-2024-08-06")
    assert price.priced_as == "gpt-4o-2024-08-06"
    assert price.price_source == f"bundled {bundled_date()}" and bundled_date() == "2026-11-22"
    doc = price.to_json()
    assert doc["pricedAs"] == "gpt-4o-2024-08-06" and doc["priceSource"] == "bundled 2026-11-22"
    mine = tmp_path / "p.toml"
    mine.write_text('[models."gpt-4o"]\ninput = 2\n')
    assert found(load_price_table(mine), "gpt-4o").price_source == f"file {mine}"


def test_cached_per_model_provider_and_local() -> None:
    t = table_of(p("ollama/m", 1, 1))
    assert t.priced("m", "ollama") is t.priced("m", "ollama")
    assert t.priced("x", "ollama", local=True) is t.priced("x", "ollama", local=True)
    assert t.priced("x", "ollama") is None
    assert t._priced[("x", "ollama", True)] is not None
    assert t._priced[("x", "ollama", False)] is None


# --- service tiers, per-call fees, audio and image tokens (the figures) ------------


def with_extras(counts: TokenCounts, **extras: object) -> TokenCounts:
    return counts._replace(extras=Extras(**extras))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "tier", "counts", "usd"),
    [
        # flex prices are half the standard ones ($0.625 / $0.0625 / $5)
        ("gpt-5", "flex", TokenCounts(input_tokens=3805, output_tokens=0), None),
        ("gpt-5", "priority", TokenCounts(input_tokens=1220, output_tokens=450), "0.01205"),
        ("gpt-5", "default", TokenCounts(input_tokens=1220, output_tokens=450), "0.006025"),
        ("gpt-4o-mini", "priority", TokenCounts(input_tokens=1000, output_tokens=1000), "0.00125"),
        ("gpt-4o-mini", "auto", TokenCounts(input_tokens=1000, output_tokens=1000), "0.00075"),
        ("gpt-5", "priority", TokenCounts(input_tokens=1600, output_tokens=250), "0.009"),
        # a tier the table has no price for is billed at the standard price
        ("gpt-4o-mini", "flex", TokenCounts(input_tokens=1000, output_tokens=1000), "0.00075"),
        ("gpt-4o-mini", "scale", TokenCounts(input_tokens=1000, output_tokens=1000), "0.00075"),
    ],
)
def test_service_tiers(
    table: PriceTable, model: str, tier: str, counts: TokenCounts, usd: str | None
) -> None:
    cost = table.cost(model, with_extras(counts, service_tier=tier), "openai")
    if usd is None:  # 3805 uncached input at flex $0.625
        usd = str(D(3805) * D("0.625") / 10**6)
    assert cost == D(usd)


def test_the_recorded_flex_response_costs_half(table: PriceTable) -> None:
    # responses_stream_reasoning_gpt-5.sse answered with service_tier "flex"
    counts = TokenCounts(input_tokens=53, output_tokens=469, reasoning_tokens=448)
    assert table.cost("gpt-5", counts, "openai") == D("0.00475625")  # what it was charged
    assert table.cost("gpt-5", with_extras(counts, service_tier="flex"), "openai") == D(
        "0.002378125"
    )


@pytest.mark.parametrize(
    ("model", "provider", "counts", "calls", "usd"),
    [
        # the recorded gpt-5 web search: $0.00828875 in tokens + one $0.01 call
        (
            "gpt-5",
            "openai",
            TokenCounts(input_tokens=9463, cached_input_tokens=8320, output_tokens=582),
            (("web_search", 1),),
            "0.01828875",
        ),
        # Anthropic: 3 web_search_requests at $10 per 1,000 on $0.0045 of tokens
        (
            "claude-sonnet-4-5",
            "anthropic",
            TokenCounts(input_tokens=1000, output_tokens=100),
            (("web_search", 3),),
            "0.0345",
        ),
        # file search $2.50 per 1,000 calls; one code interpreter container $0.03
        (
            "gpt-5",
            "openai",
            TokenCounts(input_tokens=1000, output_tokens=0),
            (("code_interpreter", 1), ("file_search", 2)),
            "0.03625",
        ),
        # a tool with no fee anywhere costs its tokens only
        (
            "claude-sonnet-4-5",
            "anthropic",
            TokenCounts(input_tokens=1000, output_tokens=100),
            (("code_execution", 2),),
            "0.0045",
        ),
    ],
)
def test_per_call_tool_fees(
    table: PriceTable,
    model: str,
    provider: str,
    counts: TokenCounts,
    calls: tuple[tuple[str, int], ...],
    usd: str,
) -> None:
    counts = with_extras(counts, tool_calls=calls)
    assert table.cost(model, counts, provider) == D(usd)
    price = table.priced(model, provider)
    assert price is not None
    tokens = price.token_cost(counts)
    assert tokens is not None and price.tool_cost(counts) == D(usd) - tokens


@pytest.mark.parametrize(
    ("model", "counts", "extras", "text_usd", "usd"),
    [
        # gpt-audio: 800 audio tokens in ($32), 400 of 550 out audio ($64)
        (
            "gpt-audio",
            TokenCounts(input_tokens=800, output_tokens=550),
            {"input_audio_tokens": 800, "output_audio_tokens": 400},
            "0.0075",
            "0.0527",
        ),
        # gemini-2.5-flash: 800 of 1,000 input tokens audio ($1 against $0.30)
        (
            "gemini-2.5-flash",
            TokenCounts(input_tokens=1000, output_tokens=100),
            {"input_audio_tokens": 800},
            "0.00055",
            "0.00111",
        ),
        # an image price the table lacks: image tokens at the text price
        (
            "gpt-4o",
            TokenCounts(input_tokens=1000, output_tokens=0),
            {"input_image_tokens": 500},
            "0.0025",
            "0.0025",
        ),
    ],
)
def test_audio_and_image_tokens_at_their_own_prices(
    table: PriceTable,
    model: str,
    counts: TokenCounts,
    extras: dict[str, int],
    text_usd: str,
    usd: str,
) -> None:
    assert table.cost(model, counts) == D(text_usd)
    assert table.cost(model, with_extras(counts, **extras)) == D(usd)


def test_service_tier_entries_are_checked() -> None:
    with pytest.raises(PricingError, match=r"service_tiers\.flex.*ouput"):
        model_price("m", {"input": 1, "output": 2, "service_tiers": {"flex": {"ouput": 1}}})
    with pytest.raises(PricingError, match="the standard price itself"):
        model_price("m", {"input": 1, "output": 2, "service_tiers": {"default": {"input": 1}}})
    price = model_price(
        "m", {"input": 2, "output": 8, "cached_input": 1, "service_tiers": {"flex": {"input": 1}}}
    )
    flex = price.for_tier("FLEX")
    assert (flex.input, flex.output, flex.cached_input) == (D(1), D(8), D(1))  # the rest: base
    assert price.for_tier("priority") is price and price.for_tier(None) is price


def test_a_priority_request_reserves_at_the_priority_price(table: PriceTable) -> None:
    # what Accountant.reserve_cost holds for a request asking service_tier "priority"
    price = table.priced("gpt-5", "openai")
    assert price is not None
    standard = price.reserve_cost(1000, 1000)
    assert standard == D("0.01125")
    assert price.for_tier("priority").reserve_cost(1000, 1000) == 2 * standard
