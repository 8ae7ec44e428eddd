"""Price files (docs/reference.md §4): the bundled table, the converters, imports and
user price files."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest

from spendgate.price_files import (
    bundled_attribution,
    bundled_date,
    convert_litellm,
    convert_models_dev,
    detect_format,
    import_table,
    load_price_table,
)
from spendgate.pricing import PriceTable, PriceTier, PricingError, model_price
from spendgate.usage import TokenCounts
from tests.helpers.prices import found
from tests.paths import PRICE_DATA

D = Decimal


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


@pytest.fixture(scope="module")
def litellm() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(PRICE_DATA.read_bytes())
    return data


# --- bundled table ----------------------------------------------------------------------


def test_bundled_attribution_and_license() -> None:
    text = bundled_attribution()
    assert "LiteLLM" in text and "MIT" in text and "1.109.1" in text
    assert "claude-3-5-sonnet-20240620" in text  # derived entries are declared
    data = resources.files("spendgate").joinpath("data")
    assert "MIT License" in data.joinpath("LICENSE-model_prices.txt").read_text()
    assert len(data.joinpath("prices.json").read_bytes()) < 400_000


def test_bundled_covers_the_built_in_providers(table: PriceTable) -> None:
    for model, provider in [
        ("gpt-4o", "openai"),
        ("gpt-4.1", "openai"),
        ("o3", "openai"),
        ("text-embedding-3-small", "openai"),
        ("claude-sonnet-4-6", "anthropic"),
        ("claude-opus-4-1-20250805", "anthropic"),
        ("gemini-2.5-flash", "gemini"),
        ("llama3", "ollama"),
        ("deepseek-chat", "deepseek"),
    ]:
        price = table.resolve(model, provider)
        assert price is not None and price.priced, model
        assert price.provider == provider, model


def test_bundled_matches_the_public_table(litellm: dict[str, Any]) -> None:
    """Every bundled entry not marked derived carries the public table's prices exactly."""
    bundled = orjson.loads(
        resources.files("spendgate").joinpath("data", "prices.json").read_bytes()
    )
    converted = convert_litellm(litellm, api_ids=True)
    checked = 0
    for key, raw in bundled["models"].items():
        if "_derived_from" in raw:
            continue
        # the bundled layer itself: the overrides file fills in beneath it (its own tests)
        assert model_price(key, converted[key]) == model_price(key, raw), key
        checked += 1
    assert checked > 300


# --- converters -------------------------------------------------------------------------


def test_convert_litellm_whole_public_table(litellm: dict[str, Any]) -> None:
    converted = convert_litellm(litellm)
    assert "sample_spec" not in converted
    priced = [
        k
        for k, v in litellm.items()
        if k != "sample_spec"
        and isinstance(v.get("input_cost_per_token"), int | float)
        and isinstance(v.get("output_cost_per_token"), int | float)
    ]
    assert len(priced) > 3000
    for key in priced:
        spec, entry = litellm[key], converted[key]
        assert entry["input"] == D(repr(float(spec["input_cost_per_token"]))) * 1_000_000, key
        assert entry["output"] == D(repr(float(spec["output_cost_per_token"]))) * 1_000_000, key
        assert model_price(key, entry).priced, key
    for key, entry in converted.items():
        model_price(key, entry)  # every converted entry is valid spendgate input


def test_convert_litellm_spot_checks(litellm: dict[str, Any]) -> None:
    c = convert_litellm(litellm)
    assert c["gpt-4o-mini"] == {
        "input": D("0.15"),
        "output": D("0.6"),
        "cached_input": D("0.075"),
        "provider": "openai",
        "context_window": 128000,
        "max_output_tokens": 16384,
        # *_priority and *_batches prices; search_context_cost_per_query per call
        "service_tiers": {
            "batch": {"input": D("0.075"), "output": D("0.3")},
            "priority": {"input": D("0.25"), "output": D(1), "cached_input": D("0.125")},
        },
        "tool_fees": {"web_search": D("0.025")},
    }
    gpt5 = c["gpt-5"]["service_tiers"]
    assert (gpt5["flex"]["input"], gpt5["flex"]["output"]) == (D("0.625"), D(5))
    assert c["gpt-5.4"]["service_tiers"]["flex"]["tiers"][0]["above_input_tokens"] == 272000
    audio = c["gpt-audio"]
    assert (audio["input_audio"], audio["output_audio"]) == (D(32), D(64))
    # DashScope's tiered_pricing: bands by input size
    qwen = c["dashscope/qwen3-coder-plus"]
    assert (qwen["input"], qwen["output"]) == (D(1), D(5))
    assert [t["above_input_tokens"] for t in qwen["tiers"]] == [32000, 128000, 256000]
    assert qwen["tiers"][2]["output"] == D(60)
    sonnet = c["claude-sonnet-4-6"]
    assert (sonnet["cache_write"], sonnet["cache_write_1h"]) == (D("3.75"), D(6))
    assert c["gemini/gemini-2.5-pro"]["tiers"] == [
        {
            "above_input_tokens": 200000,
            "input": D("2.5"),
            "output": D(15),
            "cached_input": D("0.25"),
        }
    ]
    assert c["gpt-5.4"]["tiers"][0]["above_input_tokens"] == 272000
    assert c["gemini/gemma-3-27b-it"]["tiers"][0]["above_input_tokens"] == 128000
    assert c["mistral/mistral-embed"]["output"] == 0  # embeddings: no generated tokens
    assert "dall-e-3" not in c  # priced per image


MODELS_DEV = {
    "openai": {
        "id": "openai",
        "models": {
            "gpt-4o": {
                "id": "gpt-4o",
                "cost": {"input": 2.5, "output": 10, "cache_read": 1.25},
                "limit": {"context": 128000, "output": 16384},
            },
            "gpt-image-1": {"id": "gpt-image-1", "limit": {"context": 0, "output": 0}},
        },
    },
    "google": {
        "models": {
            "gemini-2.5-pro": {
                "cost": {
                    "input": 1.25,
                    "output": 10,
                    "cache_read": 0.31,
                    "context_over_200k": {"input": 2.5, "output": 15, "cache_read": 0.625},
                },
                "limit": {"context": 1048576, "output": 65536},
            }
        }
    },
    "groq": {
        "models": {
            "llama-3.3-70b-versatile": {
                "cost": {"input": 0.59, "output": 0.79},
                "limit": {"context": 131072, "input": 120000, "output": 32768},
            }
        }
    },
}


def test_convert_models_dev() -> None:
    c = convert_models_dev(MODELS_DEV)
    assert set(c) == {"gpt-4o", "gemini-2.5-pro", "groq/llama-3.3-70b-versatile"}
    assert c["gpt-4o"] == {
        "provider": "openai",
        "input": D("2.5"),
        "output": D(10),
        "cached_input": D("1.25"),
        "context_window": 128000,
        "max_output_tokens": 16384,
    }
    assert c["gemini-2.5-pro"]["provider"] == "gemini"
    assert c["gemini-2.5-pro"]["tiers"] == [
        {
            "above_input_tokens": 200000,
            "input": D("2.5"),
            "output": D(15),
            "cached_input": D("0.625"),
        }
    ]
    assert c["groq/llama-3.3-70b-versatile"]["context_window"] == 120000  # limit.input wins
    assert convert_models_dev({"providers": MODELS_DEV}) == c
    t = PriceTable({k: model_price(k, v) for k, v in c.items()})
    assert t.resolve("llama-3.3-70b-versatile", "groq") is not None


def test_detect_format(litellm: dict[str, Any]) -> None:
    assert detect_format(litellm) == "litellm"
    assert detect_format(MODELS_DEV) == "models.dev"
    assert detect_format({"providers": MODELS_DEV}) == "models.dev"
    assert detect_format({"models": {"x": {"input": 1, "output": 2}}}) == "spendgate"
    with pytest.raises(PricingError):
        detect_format({"hello": "world"})


def test_import_table_detects_format(tmp_path: Path) -> None:
    dev = tmp_path / "api.json"
    dev.write_text(json.dumps(MODELS_DEV))
    assert import_table(dev)["gpt-4o"]["input"] == D("2.5")
    assert import_table(PRICE_DATA)["gpt-4o-mini"]["cached_input"] == D("0.075")


# --- user price files -------------------------------------------------------------------

USER_TOML = """
[models."my-model"]
input = 1.1
output = 2.2
cached_input = 0.11
context_window = 32000

[models."gpt-4o"]  # a partial override keeps the bundled fields it does not set
input = 2.0

[[models."my-tiered".tiers]]
above_input_tokens = 1000
input = 9

[models."my-tiered"]
input = 1
output = 1

[aliases]
"house-model" = "my-model"
"""


def test_user_toml_overrides_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(USER_TOML)
    t = load_price_table(path, aliases={"cfg-alias": "gpt-4o"})
    mine = t.resolve("my-model")
    assert mine is not None and mine.source == str(path)
    assert (mine.input, mine.output, mine.cached_input) == (D("1.1"), D("2.2"), D("0.11"))
    assert mine.context_window == 32000
    gpt = t.resolve("gpt-4o")
    assert gpt is not None and gpt.source == str(path)
    assert (gpt.input, gpt.output, gpt.cached_input) == (D(2), D(10), D("1.25"))
    # (1000 x 2 + 100 x 10) / 1e6 with the overridden input price
    assert t.cost("gpt-4o", TokenCounts(input_tokens=1000, output_tokens=100)) == D("0.003")
    assert t.resolve("house-model") is mine
    assert t.resolve("cfg-alias") is gpt
    assert found(t, "my-tiered").tiers == (PriceTier(1000, input=D(9)),)
    assert found(load_price_table(), "gpt-4o").input == D("2.5")


def test_user_json_overrides_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        '{"models": {"my-model": {"input": 0.1, "output": "0.3"},'
        ' "claude-sonnet-4-6": {"cache_write_1h": 7}}, "aliases": {"mm": "my-model"}}'
    )
    t = load_price_table(path)
    assert found(t, "mm").output == D("0.3")
    sonnet = t.resolve("claude-sonnet-4-6")
    assert sonnet is not None and (sonnet.input, sonnet.cache_write_1h) == (D(3), D(7))


def test_user_file_may_be_a_litellm_table(tmp_path: Path) -> None:
    path = tmp_path / "litellm.json"
    path.write_text(
        json.dumps({"acme/x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}})
    )
    t = load_price_table(path)
    assert t.cost("x", TokenCounts(input_tokens=10, output_tokens=10), "acme") == D("0.00003")


def test_whole_litellm_table_as_user_file_keeps_gemini_api_entries() -> None:
    # LiteLLM keys Vertex AI's Gemini entries "gemini-2.5-pro" and the Gemini API's
    # "gemini/gemini-2.5-pro": the Gemini API entry must win the bare id.
    t = load_price_table(PRICE_DATA)
    assert len(t) > 3000
    price = found(t, "gemini-2.5-pro")
    assert price.provider == "gemini" and price.source == str(PRICE_DATA)
    assert found(t, "gpt-4o-mini").cached_input == D("0.075")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."m"]\nouput = 1\n', "unknown field(s) ouput"),
        ('[models."m"]\ninput = -1\n', "input must be a non-negative number"),
        ('[models."m"]\ncontext_window = 1.5\n', "context_window must be a whole number"),
        ('[models."m"\n', "not valid toml"),
    ],
)
def test_bad_user_file_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricingError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_price_table(path)
    assert str(path) in str(e.value)


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="cannot read"):
        load_price_table(tmp_path / "nope.toml")


# --- duplicates and the bundled table's date (issue #18) -----------------------------------


def test_a_free_gemini_api_entry_never_replaces_a_priced_one(litellm: dict[str, Any]) -> None:
    # LiteLLM lists gemini/gemini-exp-1206 at $0 and gemini-exp-1206 at $0.30 / $2.50
    free, priced = litellm["gemini/gemini-exp-1206"], litellm["gemini-exp-1206"]
    assert (free["input_cost_per_token"], priced["input_cost_per_token"]) == (0, 3e-07)
    entry = convert_litellm(litellm, api_ids=True)["gemini-exp-1206"]
    assert (entry["input"], entry["output"]) == (D("0.3"), D("2.5"))
    # a priced Gemini API entry still wins the bare id over LiteLLM's Vertex AI one
    both = {
        "m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
        "gemini/m": {"input_cost_per_token": 2e-06, "output_cost_per_token": 2e-06,
                     "litellm_provider": "gemini"},
    }  # fmt: skip
    assert convert_litellm(both, api_ids=True)["m"]["input"] == D(2)


def test_the_bundled_table_has_a_date(table: PriceTable) -> None:
    assert bundled_date() == "2026-11-22"
    assert [s["source"] for s in table.sources] == ["overrides", "bundled"]
    assert table.sources[1]["date"] == "2026-11-22"
    assert found(table, "gpt-4o").source_date == "2026-11-22"


def test_the_example_pricing_file_loads_with_every_kind_of_price() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "pricing.example.toml"
    price = load_price_table(example).get("my-gateway-model")
    assert price is not None and price.tool_fees == {"web_search": D("0.01")}
    assert (price.input_audio, price.service_tiers["flex"].output) == (D(8), D(2))
