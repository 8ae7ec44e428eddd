"""The shipped overrides file (src/spendgate/data/price_overrides.json, docs/reference.md
§4, The table): every entry cites its source, it fills in only what the table lacks,
a stored update and the user's file win over it, and its prices are the providers'."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from spendgate.price_files import (
    StoredUpdate,
    _table,
    load_price_table,
    parse_overrides,
    shipped_overrides,
)
from spendgate.pricing import OVERRIDES, TOOLS, PriceTable, PricingError
from spendgate.usage import TokenCounts

D = Decimal
_URL = re.compile(r"^https://[a-z0-9.-]+\.[a-z]{2,}/\S+")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    text = resources.files("spendgate").joinpath("data", "price_overrides.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def test_every_entry_cites_its_source_and_the_day_it_was_checked(raw: dict[str, Any]) -> None:
    assert _DAY.match(raw["_date"])
    cited = [*raw["models"].items(), *raw["tool_fees"].items()]
    assert len(cited) >= 10
    for key, entry in cited:
        assert _URL.match(entry.get("_source", "")), key
        assert _DAY.match(entry.get("_checked", "")), key
        assert entry["_checked"] <= raw["_date"], key


def test_the_shipped_file_is_valid_and_read_whole(raw: dict[str, Any]) -> None:
    overrides = shipped_overrides()
    assert set(overrides.models) == set(raw["models"])
    assert overrides.date == raw["_date"]
    for fees in overrides.tool_fees.values():
        assert {k for k in fees if not k.startswith("_")} <= set(TOOLS)


def test_a_bad_entry_names_itself() -> None:
    with pytest.raises(PricingError, match=r"'qwen-x'.*ouput"):
        parse_overrides({"models": {"qwen-x": {"input": 1, "ouput": 2}}})
    with pytest.raises(PricingError, match=r"tool_fees\.openai.*web_serch"):
        parse_overrides({"models": {}, "tool_fees": {"openai": {"web_serch": 0.01}}})
    with pytest.raises(PricingError, match="non-negative"):
        parse_overrides({"models": {}, "tool_fees": {"anthropic": {"web_search": -1}}})


@pytest.mark.parametrize(
    ("model", "input_tokens", "output_tokens", "usd"),
    [
        # Anthropic's long-context rate: input above 200k bills the whole request at
        # $6 / $22.50 per million (the case: $0.915 before, $1.8225 now).
        ("claude-sonnet-4-5", 300_000, 1_000, "1.8225"),
        ("claude-sonnet-4-5-20250929", 300_000, 1_000, "1.8225"),
        ("claude-sonnet-4-20250514", 250_000, 2_000, "1.545"),
        ("claude-sonnet-4-0", 250_000, 2_000, "1.545"),  # Anthropic's alias
        # at the threshold itself, the standard $3 / $15
        ("claude-sonnet-4-5", 200_000, 1_000, "0.615"),
    ],
)
def test_long_context_rates(
    table: PriceTable, model: str, input_tokens: int, output_tokens: int, usd: str
) -> None:
    counts = TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens)
    assert table.cost(model, counts, "anthropic") == D(usd)


def test_long_context_cache_reads_and_writes_scale_with_input(table: PriceTable) -> None:
    # 210k input: 100k cache reads at $0.60, 50k 5-minute writes at $7.50, 10k 1-hour
    # writes at $12, 50k uncached at $6; 1k output at $22.50.
    counts = TokenCounts(
        input_tokens=210_000,
        cached_input_tokens=100_000,
        cache_write_tokens=60_000,
        cache_write_1h_tokens=10_000,
        output_tokens=1_000,
    )
    expected = (100_000 * D("0.6") + 50_000 * D("7.5") + 10_000 * D(12) + 50_000 * D(6)) / 10**6
    expected += 1_000 * D("22.5") / 10**6
    assert table.cost("claude-sonnet-4-5", counts, "anthropic") == expected


@pytest.mark.parametrize(
    ("model", "input_tokens", "output_tokens", "usd"),
    [
        # Alibaba Cloud international list prices, billed by the request's input size
        ("qwen3-coder-plus", 10_000, 1_000, "0.015"),  # $1 / $5
        ("qwen3-coder-plus", 40_000, 1_000, "0.081"),  # above 32k: $1.80 / $9
        ("qwen3-coder-plus", 300_000, 1_000, "1.86"),  # above 256k: $6 / $60
        ("qwen3-coder-flash", 10_000, 1_000, "0.0045"),  # $0.30 / $1.50
        ("qwen3-coder-480b-a35b-instruct", 10_000, 1_000, "0.0225"),  # $1.50 / $7.50
        ("qwen-plus", 10_000, 1_000, "0.0052"),  # $0.40 / $1.20
        ("qwen-max", 10_000, 1_000, "0.0224"),  # $1.60 / $6.40
        ("qwen3-max", 10_000, 1_000, "0.018"),  # $1.20 / $6
    ],
)
def test_qwen_code_models_are_priced_on_any_route(
    table: PriceTable, model: str, input_tokens: int, output_tokens: int, usd: str
) -> None:
    counts = TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens)
    for provider in (None, "openai", "dashscope", "qwen"):
        price = table.priced(model, provider)
        assert price is not None, (model, provider)
        assert price.cost(counts) == D(usd)
    # on a route of its own provider the bundled dashscope/… listing, where it has one,
    # comes first (§4 step 1); elsewhere the overrides' entry
    price = table.priced(model, "openai")
    assert price is not None and price.price_source == f"{OVERRIDES} {shipped_overrides().date}"


def test_qwen_implicit_cache_hits_cost_a_fifth_of_input(table: PriceTable) -> None:
    counts = TokenCounts(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=0)
    assert table.cost("qwen3-coder-plus", counts) == (2_000 * D(1) + 8_000 * D("0.2")) / 10**6


def test_tool_fees_by_provider(table: PriceTable) -> None:
    gpt = table.priced("gpt-5", "openai")
    mini = table.priced("gpt-4o-mini", "openai")
    claude = table.priced("claude-3-5-haiku-20241022", "anthropic")
    assert gpt is not None and mini is not None and claude is not None
    assert gpt.tool_fees["web_search"] == D("0.01")
    assert gpt.tool_fees["file_search"] == D("0.0025")
    assert gpt.tool_fees["code_interpreter"] == D("0.03")
    assert mini.tool_fees["web_search"] == D("0.025")  # the table's own price wins
    assert claude.tool_fees == {"web_search": D("0.01")}  # $10 per 1,000 searches


def test_the_source_says_the_overrides_filled_a_gap(table: PriceTable) -> None:
    date = shipped_overrides().date
    patched = table.priced("claude-sonnet-4-5")
    plain = table.priced("claude-haiku-4-5")
    assert patched is not None and plain is not None
    assert patched.price_source.endswith(f" + overrides {date}")
    assert patched.price_source.startswith("bundled ")
    # a provider-wide tool fee is not a price of the entry's own
    assert " + " not in plain.price_source
    assert table.sources[0] == {
        "source": OVERRIDES,
        "date": date,
        "models": len(shipped_overrides().models),
    }


def test_a_field_the_table_has_wins_over_the_overrides() -> None:
    own_tier = {"above_input_tokens": 150_000, "input": 9, "output": 30}
    update = StoredUpdate(
        {
            "claude-sonnet-4-5": {"input": 3, "output": 15, "tiers": [own_tier]},
            "gpt-4.1": {
                "input": 2,
                "output": 8,
                "provider": "openai",
                "tool_fees": {"web_search": 0.025},
            },
        },
        "test",
        "2026-12-01",
        "2026-12-01T00:00:00Z",
        "litellm",
    )
    table = _table(update, None, None)
    sonnet = table.get("claude-sonnet-4-5")
    gpt = table.get("gpt-4.1")
    assert sonnet is not None and gpt is not None
    assert [t.above_input_tokens for t in sonnet.tiers] == [150_000]
    assert sonnet.price_source == "update 2026-12-01"
    assert gpt.tool_fees["web_search"] == D("0.025")  # the table's own fee
    assert gpt.tool_fees["file_search"] == D("0.0025")  # the gap filled


def test_your_file_wins_over_the_overrides(tmp_path: Path) -> None:
    mine = tmp_path / "pricing.toml"
    mine.write_text(
        '[models."qwen3-coder-plus"]\ninput = 0.5\noutput = 2\ntiers = []\n'
        '[models."claude-sonnet-4-5"]\ntiers = []\n'
        '[models."gpt-4.1"]\ntool_fees = { web_search = 0.02 }\n'
    )
    table = load_price_table(mine)
    counts = TokenCounts(input_tokens=300_000, output_tokens=1_000)
    assert table.cost("qwen3-coder-plus", counts) == (300_000 * D("0.5") + 1_000 * D(2)) / 10**6
    assert table.cost("claude-sonnet-4-5", counts) == D("0.915")
    gpt = table.priced("gpt-4.1")
    assert gpt is not None and gpt.tool_fees["web_search"] == D("0.02")
    assert gpt.tool_fees["file_search"] == D("0.0025")  # a fee you did not set stays
    assert gpt.price_source == f"file {mine}"
