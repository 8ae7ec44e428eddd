"""Derive the bundled price table (src/spendgate/data/prices.json) from LiteLLM's.

Run it when the public table is refreshed::

    python scripts/build_prices.py [--source PATH] [--license PATH] [--source-version 1.109.1]

``--source`` defaults to the copy vendored for the tests
(tests/fixtures/prices/model_prices_and_context_window.json) and ``--license`` to the
LICENSE-model_prices.txt beside the source.

It keeps the token-priced chat/completion/embedding/responses models of the built-in
providers and a few popular OpenAI-compatible ones, converts them to spendgate's
per-million format with :func:`spendgate.price_files.convert_litellm`, fills in
first-party ids of older Claude models that LiteLLM lists only under Bedrock, and
copies LiteLLM's MIT license beside the output.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spendgate.price_files import convert_litellm, dumps_table  # noqa: E402
from spendgate.pricing import (  # noqa: E402
    PREFIX_ORDER,
    PriceTable,
    model_price,
    spelling,
)

VENDORED = ROOT / "tests" / "fixtures" / "prices"
OUT_DIR = ROOT / "src" / "spendgate" / "data"

# litellm_provider values kept; gemini keys lose their "gemini/" prefix because the
# Gemini API names models without it (convert_litellm(api_ids=True)). Others keep
# LiteLLM's keys (xai/grok-4, ...), found by resolve(model, provider) trying
# "provider/model" first.
PROVIDERS = ("openai", "anthropic", "gemini", "ollama")
COMPATIBLE = ("xai", "deepseek", "groq", "mistral", "openrouter", "dashscope")
MODES = {"chat", "completion", "embedding", "responses"}
# Clouds that list the makers' models: their entries are kept for models that have no
# first-party entry (vertex_ai/gemini-3-pro-preview, vertex_ai/claude-3-haiku@20240307,
# azure/gpt-35-turbo), one per model, in pricing.PREFIX_ORDER.
CLOUDS = (
    "vertex_ai",
    "vertex_ai-language-models",
    "vertex_ai-anthropic_models",
    "azure",
    "azure_text",
    "bedrock",
    "bedrock_converse",
    "azure_ai",
)
# A regional or cross-region listing (us.anthropic..., bedrock/us-gov-west-1/...,
# azure/eu/...): priced with an uplift, not the model's list price.
REGIONAL = re.compile(
    r"(?:^|/)(?:[a-z]{2}(?:-gov)?|apac|global)\.|/(?:[a-z]{2}(?:-[a-z]+)+-\d|eu|us|global)/"
)

# Bedrock base ids (no region prefix) of Claude models: anthropic.<id>[-vN[:M]].
BEDROCK_ID = re.compile(
    r"^(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek|openai|qwen)\.(.+?)(?:-v\d+(?::\d+)?)?$"
)
BEDROCK_CLAUDE = re.compile(
    r"^anthropic\.(claude-(?:\d|opus|sonnet|haiku)[a-z0-9.-]*?)(?:-v\d+(?::\d+)?)?$"
)
# A Bedrock-only id Anthropic never released (3.7 Sonnet is 20250219), priced with a
# regional uplift: not a first-party model.
NOT_FIRST_PARTY = {"claude-3-7-sonnet-20240620"}
# Anthropic's documented aliases for older models (docs.anthropic.com, models overview),
# so reservations made with the requested alias find a price.
CLAUDE_ALIASES = {
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-opus-latest": "claude-3-opus-20240229",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
}


def select(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The kept entries, keyed as the providers' APIs name the models."""
    kept = {
        k: v
        for k, v in data.items()
        if isinstance(v, dict)
        and v.get("mode") in MODES
        and v.get("litellm_provider") in PROVIDERS + COMPATIBLE
    }
    return convert_litellm(kept, api_ids=True)


def keep_elsewhere(data: dict[str, Any], models: dict[str, dict[str, Any]]) -> list[str]:
    """Add, for each model the kept entries do not price, the best other provider's
    listing of it (pricing.PREFIX_ORDER: vertex_ai, azure, bedrock, azure_ai), under its
    own key, so it resolves as docs/reference.md §4 step 4 says."""
    kept = PriceTable({k: model_price(k, v) for k, v in models.items()})
    rank = {p: i for i, p in enumerate(PREFIX_ORDER)}
    best: dict[str, tuple[tuple[int, str], str, dict[str, Any]]] = {}
    for key, spec in data.items():
        if (
            not isinstance(spec, dict)
            or spec.get("mode") not in MODES
            or spec.get("litellm_provider") not in CLOUDS
            or REGIONAL.search(key)
            or key.count("/") > 1
        ):
            continue
        entry = convert_litellm({key: spec}).get(key)
        if entry is None:
            continue
        name = key.rpartition("/")[2]
        m = BEDROCK_ID.match(name)
        name = spelling((m[1] if m else name).replace("@", "-"))
        found = kept.resolve(name)
        if found is not None and found.priced:
            continue
        order = (rank.get(key.partition("/")[0] if "/" in key else "bedrock", len(rank)), key)
        if name not in best or order < best[name][0]:
            best[name] = (order, key, entry)
    for _, key, entry in best.values():
        models[key] = entry
    return sorted(key for _, key, _ in best.values())


def derive_claude(data: dict[str, Any], models: dict[str, dict[str, Any]]) -> list[str]:
    """Add first-party ids for Claude models LiteLLM lists only as Bedrock entries.

    Bedrock's on-demand list prices for Claude equal Anthropic's. Where Bedrock gives
    no one-hour cache-write price, Anthropic's rule (2x the base input price) fills it.
    """
    derived = []
    for key, spec in sorted(data.items()):
        m = BEDROCK_CLAUDE.match(key)
        if not m or not isinstance(spec, dict) or spec.get("mode") != "chat":
            continue
        model_id = m.group(1)
        if model_id in models or model_id in NOT_FIRST_PARTY or "@" in model_id:
            continue
        if not str(spec.get("litellm_provider", "")).startswith("bedrock"):
            continue
        entry = convert_litellm({key: spec}).get(key)
        if entry is None:
            continue
        entry["provider"] = "anthropic"
        note = f"Bedrock entry {key} (same list price)"
        filled = False
        for prices in [entry, *entry.get("tiers", [])]:
            if "cache_write_1h" not in prices and "input" in prices:
                prices["cache_write_1h"] = prices["input"] * 2
                filled = True
        if filled:
            note += "; cache_write_1h = 2 x input (Anthropic's 1-hour cache rule)"
        entry["_derived_from"] = note
        models[model_id] = entry
        derived.append(model_id)
    return derived


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--source", type=Path, default=VENDORED / "model_prices_and_context_window.json"
    )
    ap.add_argument("--license", type=Path, help="LiteLLM's license (default: beside --source)")
    ap.add_argument(
        "--source-version", default="1.109.1", help="litellm package version of --source"
    )
    ap.add_argument("--out", type=Path, default=OUT_DIR / "prices.json")
    ap.add_argument(
        "--date",
        default=datetime.now(UTC).date().isoformat(),
        help="the table's date (_date: the day the source was published; default today)",
    )
    args = ap.parse_args(argv)
    license_file: Path = args.license or args.source.parent / "LICENSE-model_prices.txt"

    raw = args.source.read_bytes()
    data: dict[str, Any] = orjson.loads(raw)
    models = select(data)
    derived = derive_claude(data, models)
    elsewhere = keep_elsewhere(data, models)
    aliases = {a: t for a, t in CLAUDE_ALIASES.items() if t in models and a not in models}
    for key, entry in models.items():
        model_price(key, entry)  # the loader must accept every entry
        for value in entry.values():
            assert not isinstance(value, Decimal) or value == Decimal(repr(float(value))), key

    attribution = (
        "Prices derived from LiteLLM's model_prices_and_context_window.json "
        f"(BerriAI/litellm, MIT license, see LICENSE-model_prices.txt; as shipped in the "
        f"litellm {args.source_version} package on PyPI, sha256 "
        f"{hashlib.sha256(raw).hexdigest()[:16]}). Built by scripts/build_prices.py: kept the "
        f"token-priced {'/'.join(sorted(MODES))} models of litellm_provider "
        f"{', '.join(PROVIDERS + COMPATIBLE)}; 'gemini/' key prefixes removed; USD per token "
        "converted exactly to USD per million tokens; *_above_NNNk_tokens prices became "
        "tiers. Derived, not in the source under these ids: "
        f"{', '.join(derived)} (first-party ids of Claude models listed only as Bedrock "
        "entries, at Bedrock's list price which equals Anthropic's; a missing "
        "cache_write_1h set to 2x input per Anthropic's pricing; see each _derived_from). "
        f"Kept under another provider's key, for {len(elsewhere)} models no kept entry "
        f"prices: the first of {', '.join(CLOUDS)} listings (no regional ones) in "
        "spendgate's prefix order. Per-call tool fees (search_context_cost_per_query at "
        "the medium size, file_search_cost_per_1k_calls, code_interpreter_cost_per_session), "
        "_flex/_priority/_batches prices (service_tiers), audio and image token prices and "
        "DashScope's tiered_pricing kept. Aliases are Anthropic's documented model aliases."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(dumps_table(models, aliases, attribution, {"_date": args.date}))
    shutil.copyfile(license_file, args.out.parent / "LICENSE-model_prices.txt")
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({len(models)} models, {len(derived)} derived, {size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
