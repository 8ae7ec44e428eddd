"""Price files: spendgate's own (TOML or JSON), LiteLLM's and models.dev's tables.

Reading turns any of the three into spendgate entries (USD per million tokens, exact
Decimals) checked by :func:`~spendgate.pricing.model_price`; writing produces the JSON
that ``spendgate pricing import`` and ``scripts/build_prices.py`` keep. The table the
proxy prices with is :func:`load_price_table`: bundled, then the stored update
(``spendgate pricing update``), then the user's file, then aliases; :func:`reload_into`
swaps a running proxy's table for a fresh one.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from spendgate import __version__
from spendgate.pricing import (
    BUNDLED,
    OVERRIDES,
    PRICE_FIELDS,
    UPDATE,
    ModelPrice,
    PriceTable,
    PricingError,
    model_price,
    normalize,
    per_million,
    tier_key,
    to_decimal,
)

if TYPE_CHECKING:
    from spendgate.settings import Settings

# --- foreign formats ----------------------------------------------------------------

_LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
    "input_cost_per_audio_token": "input_audio",
    "output_cost_per_audio_token": "output_audio",
    "input_cost_per_image_token": "input_image",
    "output_cost_per_image_token": "output_image",
}
_LITELLM_PRICE = re.compile(
    r"^(cache_creation_input_token_cost_above_1hr|"
    + "|".join(k for k in _LITELLM_FIELDS if k != "cache_creation_input_token_cost_above_1hr")
    + r")(?:_above_(\d+)k_tokens)?(?:_(flex|priority|batches))?$"
)
"""A per-token price, optionally above an input size and for a service tier:
``input_cost_per_token_above_272k_tokens_priority``."""
_TIERED_FIELDS = ("input", "output", "cached_input", "cache_write")
_LITELLM_TOOLS = {
    # field → (tool, divisor): search_context_cost_per_query is per call (its
    # ``search_context_size_medium``, the default size); file search per 1,000 calls
    "search_context_cost_per_query": ("web_search", 1),
    "file_search_cost_per_1k_calls": ("file_search", 1000),
    "code_interpreter_cost_per_session": ("code_interpreter", 1),
}


def _positive_int(value: object) -> int | None:
    d = to_decimal(value)
    if d is None or d <= 0 or d != d.to_integral_value():
        return None
    return int(d)


def _litellm_prices(spec: Mapping[str, Any]) -> dict[str | None, dict[int, dict[str, Any]]]:
    """Per-million prices by service tier (None: standard) and input size (0: base)."""
    found: dict[str | None, dict[int, dict[str, Any]]] = {}
    for key, value in spec.items():
        m = _LITELLM_PRICE.match(key)
        price = per_million(value) if m else None
        if m is None or price is None:
            continue
        field, above, tier = _LITELLM_FIELDS[m[1]], int(m[2] or 0) * 1000, m[3]
        found.setdefault(tier_key(tier) if tier else None, {}).setdefault(above, {})[field] = price
    return found


def _with_tiers(by_size: dict[int, dict[str, Any]]) -> dict[str, Any]:
    entry = dict(by_size.get(0, {}))
    above = sorted(k for k in by_size if k)
    if above:
        entry["tiers"] = [{"above_input_tokens": k, **by_size[k]} for k in above]
    return entry


def _tiered_pricing(spec: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """LiteLLM's ``tiered_pricing`` list (``range: [from, to]`` of input tokens, DashScope)
    as prices by input size."""
    out: dict[int, dict[str, Any]] = {}
    for band in spec.get("tiered_pricing") or []:
        if not isinstance(band, Mapping):
            continue
        bounds = band.get("range")
        low = to_decimal(bounds[0]) if isinstance(bounds, list) and bounds else None
        if low is None or low < 0 or low != low.to_integral_value():
            continue
        prices = {}
        for src, dst in _LITELLM_FIELDS.items():
            if dst in _TIERED_FIELDS and (price := per_million(band.get(src))) is not None:
                prices[dst] = price
        if prices:
            out[int(low)] = prices
    return out


def _litellm_tool_fees(spec: Mapping[str, Any]) -> dict[str, Decimal]:
    fees = {}
    for key, (tool, per) in _LITELLM_TOOLS.items():
        value = spec.get(key)
        if isinstance(value, Mapping):
            value = value.get("search_context_size_medium")
        fee = to_decimal(value)
        if fee is not None and fee > 0:
            fees[tool] = normalize(fee / per)
    return fees


def _litellm_entry(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    prices = _litellm_prices(spec)
    standard = prices.pop(None, {})
    if not standard.get(0) and spec.get("tiered_pricing"):
        standard = _tiered_pricing(spec)
    entry: dict[str, Any] = _with_tiers(standard)
    if "input" not in entry and "output" not in entry:
        return None  # priced per image/second/query: nothing spendgate can meter
    if spec.get("mode") == "embedding" and "output" not in entry:
        entry["output"] = Decimal(0)  # embeddings generate no tokens
    services = {t: _with_tiers(by_size) for t, by_size in sorted(prices.items()) if 0 in by_size}
    if services:
        entry["service_tiers"] = services
    if fees := _litellm_tool_fees(spec):
        entry["tool_fees"] = fees
    if isinstance(spec.get("litellm_provider"), str):
        entry["provider"] = spec["litellm_provider"]
    if (window := _positive_int(spec.get("max_input_tokens"))) is not None:
        entry["context_window"] = window
    if (max_out := _positive_int(spec.get("max_output_tokens"))) is not None:
        entry["max_output_tokens"] = max_out
    return entry


def _paid(entry: Mapping[str, Any]) -> bool:
    """A spendgate-format entry with both token prices, not both 0."""
    inp, out = entry.get("input"), entry.get("output")
    return inp is not None and out is not None and (inp > 0 or out > 0)


def _free(entry: Mapping[str, Any]) -> bool:
    return entry.get("input") == 0 and entry.get("output") == 0


def convert_litellm(data: Mapping[str, Any], *, api_ids: bool = False) -> dict[str, dict[str, Any]]:
    """LiteLLM's ``model_prices_and_context_window.json`` (USD per token) → spendgate entries.

    Entries priced only per image, second or query are skipped, as is ``sample_spec``.
    ``*_above_NNNk_tokens`` prices become a tier above NNN,000 input tokens. With
    ``api_ids``, Gemini API entries (``gemini/<id>``) are keyed ``<id>``, as that API
    names its models, replacing LiteLLM's same-named entry, except that a $0 entry never
    replaces a priced one (``gemini-exp-1206``: ``gemini/`` lists it at $0, the bare
    entry at $0.30 / $2.50).
    """
    out: dict[str, dict[str, Any]] = {}
    gemini: dict[str, dict[str, Any]] = {}
    for key, spec in data.items():
        if key == "sample_spec" or not isinstance(spec, Mapping):
            continue
        entry = _litellm_entry(spec)
        if entry is None:
            continue
        if api_ids and entry.get("provider") == "gemini" and key.startswith("gemini/"):
            gemini[key.removeprefix("gemini/")] = entry
        else:
            out[key] = entry
    for key, entry in gemini.items():
        if not (_free(entry) and _paid(out.get(key) or {})):
            out[key] = entry
    return out


# models.dev ids of first-party APIs: their models keep bare ids, as the APIs name them.
_MODELS_DEV_FIRST_PARTY = {"openai": "openai", "anthropic": "anthropic", "google": "gemini"}
_MODELS_DEV_FIELDS = {
    "input": "input",
    "output": "output",
    "cache_read": "cached_input",
    "cache_write": "cache_write",
}
_MODELS_DEV_OVER = re.compile(r"^context_over_(\d+)k$")


def _models_dev_prices(cost: Mapping[str, Any]) -> dict[str, Decimal]:
    out = {}
    for src, dst in _MODELS_DEV_FIELDS.items():
        d = to_decimal(cost.get(src))
        if d is not None and d >= 0:
            out[dst] = normalize(d)
    return out


def _models_dev_entry(provider: str, model: Mapping[str, Any]) -> dict[str, Any] | None:
    cost = model.get("cost")
    if not isinstance(cost, Mapping):
        return None
    entry: dict[str, Any] = {"provider": provider, **_models_dev_prices(cost)}
    if "input" not in entry or "output" not in entry:
        return None
    tiers: dict[int, dict[str, Any]] = {}
    for tier in cost.get("tiers") or []:
        spec = tier.get("tier") if isinstance(tier, Mapping) else None
        if isinstance(spec, Mapping) and spec.get("type", "context") == "context":
            above = _positive_int(spec.get("size"))
            if above is not None:
                tiers[above] = {"above_input_tokens": above, **_models_dev_prices(tier)}
    for key, value in cost.items():
        m = _MODELS_DEV_OVER.match(key)
        if m and isinstance(value, Mapping):
            above = int(m.group(1)) * 1000
            tiers.setdefault(above, {"above_input_tokens": above, **_models_dev_prices(value)})
    if tiers:
        entry["tiers"] = [tiers[k] for k in sorted(tiers)]
    limit = model.get("limit")
    if isinstance(limit, Mapping):
        window = _positive_int(limit.get("input")) or _positive_int(limit.get("context"))
        if window is not None:
            entry["context_window"] = window
        if (max_out := _positive_int(limit.get("output"))) is not None:
            entry["max_output_tokens"] = max_out
    return entry


def _models_dev_providers(data: Mapping[str, Any]) -> Mapping[str, Any]:
    wrapped = data.get("providers")
    return wrapped if isinstance(wrapped, Mapping) and not _has_models(data) else data


def _has_models(data: Mapping[str, Any]) -> bool:
    return any(
        isinstance(v, Mapping) and isinstance(v.get("models"), Mapping) for v in data.values()
    )


def convert_models_dev(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """models.dev (``api.json``: USD per million) → spendgate entries.

    First-party providers keep bare model ids (``gpt-4o``); others are keyed
    ``provider/model`` like the bundled table, so resolution with a provider finds them.
    """
    out: dict[str, dict[str, Any]] = {}
    for provider_id, pdata in _models_dev_providers(data).items():
        if not isinstance(pdata, Mapping) or not isinstance(pdata.get("models"), Mapping):
            continue
        provider = _MODELS_DEV_FIRST_PARTY.get(provider_id, provider_id)
        for model_id, model in pdata["models"].items():
            if not isinstance(model, Mapping):
                continue
            entry = _models_dev_entry(provider, model)
            if entry is not None:
                key = (
                    model_id
                    if provider_id in _MODELS_DEV_FIRST_PARTY
                    else f"{provider_id}/{model_id}"
                )
                out[key] = entry
    return out


def detect_format(data: Mapping[str, Any]) -> str:
    """``spendgate``, ``litellm`` or ``models.dev`` for a parsed price file."""
    if isinstance(data.get("models"), Mapping) or isinstance(data.get("aliases"), Mapping):
        models = data.get("models") or {}
        if not _has_models(models) and not any(
            isinstance(v, Mapping) and any(k in v for k in _LITELLM_FIELDS) for v in models.values()
        ):
            return "spendgate"
    if _has_models(data) or (
        isinstance(data.get("providers"), Mapping) and _has_models(data["providers"])
    ):
        return "models.dev"
    if any(
        isinstance(v, Mapping) and ("litellm_provider" in v or any(k in v for k in _LITELLM_FIELDS))
        for v in data.values()
    ):
        return "litellm"
    raise PricingError("unrecognised price table: expected spendgate, LiteLLM or models.dev format")


# --- files --------------------------------------------------------------------------


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PricingError(f"{path}: cannot read price file ({e.strerror or e})") from e
    try:
        if path.suffix.lower() == ".toml":
            data: object = tomllib.loads(text, parse_float=Decimal)
        else:
            data = json.loads(text, parse_float=Decimal)  # exact, as written
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PricingError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise PricingError(f"{path}: a price file must be a table/object at the top level")
    return data


def _spendgate_tables(
    data: Mapping[str, Any], source: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    models = data.get("models") or {}
    aliases = data.get("aliases") or {}
    if not isinstance(models, Mapping) or not all(isinstance(v, Mapping) for v in models.values()):
        raise PricingError(f"{source}: [models] must map model ids to tables")
    if not isinstance(aliases, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise PricingError(f"{source}: [aliases] must map model ids to model ids")
    return {str(k): dict(v) for k, v in models.items()}, dict(aliases)


def read_price_file(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Entries (spendgate format, per million) and aliases from a TOML or JSON file.

    The file may be spendgate's own format or a whole LiteLLM / models.dev table.
    """
    data = _parse(path)
    fmt = detect_format(data)
    if fmt == "litellm":
        return convert_litellm(data, api_ids=True), {}
    if fmt == "models.dev":
        return convert_models_dev(data), {}
    models, aliases = _spendgate_tables(data, str(path))
    for key, raw in models.items():
        model_price(key, raw, str(path))  # fail early, naming the entry
    return models, aliases


def import_table(path: Path) -> dict[str, dict[str, Any]]:
    """Entries in spendgate's format from a file of any supported format (``pricing import``)."""
    return read_price_file(path)[0]


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        as_float = float(value)
        # A JSON number when its shortest float form is the same decimal, else a string.
        return as_float if Decimal(repr(as_float)) == value else str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps_table(
    models: Mapping[str, Mapping[str, Any]],
    aliases: Mapping[str, str] | None = None,
    attribution: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """A price file in spendgate's JSON format; prices read back exactly. ``meta``: more
    comment keys (``_update``)."""
    doc: dict[str, Any] = {}
    if attribution:
        doc["_attribution"] = attribution
    doc.update(meta or {})
    doc["models"] = models
    if aliases:
        doc["aliases"] = aliases
    return (
        orjson.dumps(doc, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
    )


@lru_cache(maxsize=1)
def _bundled() -> tuple[Mapping[str, Mapping[str, Any]], Mapping[str, str], str | None]:
    raw = resources.files("spendgate").joinpath("data", "prices.json").read_bytes()
    data = orjson.loads(raw)
    date = data.get("_date")
    return (*_spendgate_tables(data, BUNDLED), date if isinstance(date, str) else None)


def bundled_attribution() -> str:
    """Where the bundled prices came from (shown by ``spendgate pricing``)."""
    raw = resources.files("spendgate").joinpath("data", "prices.json").read_bytes()
    text = orjson.loads(raw).get("_attribution", "")
    return str(text)


def bundled_date() -> str | None:
    """The bundled table's date (``_date`` in src/spendgate/data/prices.json)."""
    return _bundled()[2]


@dataclass(frozen=True)
class Overrides:
    """The shipped overrides file (src/spendgate/data/price_overrides.json): prices the
    table lacks (long-context tiers, per-call tool fees, models it does not list), each
    citing its source; docs/reference.md §4, The table."""

    models: Mapping[str, Mapping[str, Any]]
    tool_fees: Mapping[str, Mapping[str, Any]]
    """Per provider (an entry's ``provider``): tool → USD per call."""
    date: str | None

    def apply(self, raws: dict[str, tuple[Mapping[str, Any], str, str | None, str | None]]) -> None:
        """Fill in, under ``raws`` (id → (entry, source, date, overrides date)), what the
        table lacks: a field the table's entry has wins; a missing entry is added whole."""
        for key, override in self.models.items():
            found = raws.get(key)
            if found is None:
                raws[key] = (override, OVERRIDES, self.date, None)
                continue
            base, source, date, _ = found
            merged = _under(base, override)
            if merged is not base:
                raws[key] = (merged, source, date, self.date)
        # Provider-wide fees: not a price of the entry's own, so priceSource keeps its
        # source (the fee charged is on the row as toolCostUsd).
        for key, (entry, source, date, patched) in list(raws.items()):
            fees = self.tool_fees.get(str(entry.get("provider", "")))
            if fees:
                raws[key] = (_under(entry, {"tool_fees": fees}), source, date, patched)


def _under(base: Mapping[str, Any], extra: Mapping[str, Any]) -> Mapping[str, Any]:
    """``base`` with the fields of ``extra`` it lacks (``tool_fees`` merged per tool);
    ``base`` itself when ``extra`` adds nothing. Comment keys (``_source``) are not
    copied."""
    added = {k: v for k, v in extra.items() if not k.startswith("_") and k not in base}
    fees = added.pop("tool_fees", None) or extra.get("tool_fees")
    if isinstance(fees, Mapping):
        have = base.get("tool_fees") or {}
        new = {t: f for t, f in fees.items() if not str(t).startswith("_") and t not in have}
        if new:
            added["tool_fees"] = {**have, **new}
    return {**base, **added} if added else base


@lru_cache(maxsize=1)
def shipped_overrides() -> Overrides:
    """The overrides file shipped in the package, read once (:func:`parse_overrides`)."""
    raw = resources.files("spendgate").joinpath("data", "price_overrides.json").read_bytes()
    return parse_overrides(json.loads(raw, parse_float=Decimal))


def parse_overrides(data: Mapping[str, Any]) -> Overrides:
    """An overrides document (the shipped file's shape), every entry checked: a bad one is
    a PricingError naming it, so a broken file fails the tests, not a request."""
    models, _ = _spendgate_tables(data, OVERRIDES)
    date = data.get("_date")
    date = date if isinstance(date, str) else None
    for key, entry in models.items():
        model_price(key, entry, OVERRIDES, date)
    fees = data.get("tool_fees") or {}
    if not isinstance(fees, Mapping) or not all(isinstance(v, Mapping) for v in fees.values()):
        raise PricingError(f"{OVERRIDES}: tool_fees must map providers to tables")
    for provider, table in fees.items():
        model_price(f"tool_fees.{provider}", {"tool_fees": table}, OVERRIDES, date)
    return Overrides(models, {str(k): dict(v) for k, v in fees.items()}, date)


@dataclass(frozen=True)
class StoredUpdate:
    """A table ``spendgate pricing update`` stored: its entries and where it came from."""

    models: Mapping[str, Mapping[str, Any]]
    origin: str
    date: str
    fetched_at: str
    format: str
    path: Path | None = None


def read_update(path: Path) -> StoredUpdate:
    """The stored update at ``path`` (written by :func:`store_update`)."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise PricingError(
            f"{path}: cannot read the stored price update ({e}); run `spendgate pricing "
            "update` again or delete the file"
        ) from e
    if not isinstance(data, dict):
        raise PricingError(f"{path}: not a stored price update")
    meta = data.get("_update")
    models, _ = _spendgate_tables(data, str(path))
    if not isinstance(meta, dict):
        raise PricingError(f"{path}: not a stored price update (no _update)")
    return StoredUpdate(
        models,
        str(meta.get("from", "")),
        str(meta.get("date", "")),
        str(meta.get("fetched", "")),
        str(meta.get("format", "")),
        path,
    )


def _table(
    update: StoredUpdate | None, user_file: Path | None, aliases: Mapping[str, str] | None
) -> PriceTable:
    bundled_models, bundled_aliases, date = _bundled()
    raws: dict[str, tuple[Mapping[str, Any], str, str | None, str | None]] = {
        k: (v, BUNDLED, date, None) for k, v in bundled_models.items()
    }
    sources: list[dict[str, Any]] = [
        {"source": BUNDLED, "date": date, "models": len(bundled_models)}
    ]
    if update is not None:
        for key, entry in update.models.items():
            raws[key] = (entry, UPDATE, update.date or None, None)
        sources.append(
            {
                "source": UPDATE,
                "date": update.date,
                "from": update.origin,
                "fetched": update.fetched_at,
                "format": update.format,
                "file": None if update.path is None else str(update.path),
                "models": len(update.models),
            }
        )
    overrides = shipped_overrides()
    overrides.apply(raws)
    # lowest first: the overrides rank under the table they fill in
    sources.insert(
        0, {"source": OVERRIDES, "date": overrides.date, "models": len(overrides.models)}
    )
    all_aliases = dict(bundled_aliases)
    if user_file is not None:
        user_models, user_aliases = read_price_file(user_file)
        for key, override in user_models.items():
            base = raws.get(key, ({}, BUNDLED, None, None))[0]
            entry = {**base, **override}
            if isinstance(base.get("tool_fees"), Mapping) and isinstance(
                override.get("tool_fees"), Mapping
            ):
                entry["tool_fees"] = {**base["tool_fees"], **override["tool_fees"]}
            raws[key] = (entry, str(user_file), None, None)
        all_aliases.update(user_aliases)
        sources.append({"source": "file", "file": str(user_file), "models": len(user_models)})
    all_aliases.update(aliases or {})
    prices = {
        k: model_price(k, raw, source, d, patched) for k, (raw, source, d, patched) in raws.items()
    }
    return PriceTable(prices, all_aliases, sources)


def load_price_table(
    user_file: Path | None = None,
    aliases: Mapping[str, str] | None = None,
    update_file: Path | None = None,
) -> PriceTable:
    """The effective table: bundled prices, then the stored update (``update_file``, when
    it exists: its entries replace bundled ones whole), then under those the shipped
    overrides (filling in only what they lack), then the user's file, then configured
    aliases.

    A user entry for a known model overrides only the fields it sets, so
    ``[models."gpt-4o"] input = 2.0`` keeps the other prices.
    """
    update = None
    if update_file is not None and update_file.exists():
        update = read_update(update_file)
    return _table(update, user_file, aliases)


def update_path(settings: Settings) -> Path:
    """Where ``spendgate pricing update`` stores the table: ``price_update_file``, else
    ``prices-update.json`` beside the database (the user data directory by default)."""
    return settings.price_update_file or settings.db_path.parent / "prices-update.json"


def settings_table(settings: Settings) -> PriceTable:
    """The table ``settings`` price with: what the proxy loads and reloads."""
    return load_price_table(settings.pricing_file, settings.model_aliases, update_path(settings))


def lookup(
    table: PriceTable,
    settings: Settings,
    model: str,
    *,
    route: str | None = None,
    provider: str | None = None,
    local: bool | None = None,
) -> tuple[ModelPrice | None, dict[str, Any]]:
    """``spendgate pricing MODEL`` and ``GET /api/pricing/{model}``: the proxy's own
    question, ``table.priced(model, provider, local=...)``, with the provider and local
    flag of the route named ``route`` unless given; and what was asked. Without either,
    as on a route whose provider has no entries of its own."""
    from spendgate.routing import build_routes

    route_provider, route_local = None, False
    if route is not None:
        routes = build_routes(settings)
        found = next((r for r in routes if r.name == route), None)
        if found is None:
            names = ", ".join(sorted(r.name for r in routes))
            raise PricingError(f"no route named {route!r} (the routes: {names})")
        route_provider, route_local = found.provider, found.local
    provider = provider or route_provider
    local = route_local if local is None else local
    asked = {"model": model, "route": route, "provider": provider, "local": local}
    return table.priced(model, provider, local=local), asked


_GENERATIONS = itertools.count(1)


async def reload_into(table: PriceTable, settings: Settings) -> PriceTable:
    """Read the price files again (in a thread) and swap them into ``table``, the one
    the accountant, the API and the metrics share; requests priced from then on see the
    new prices. A bad file raises PricingError and changes nothing. Of two reloads, the
    one started last is kept."""
    generation = next(_GENERATIONS)
    fresh = await asyncio.to_thread(settings_table, settings)
    table.replace_with(fresh, generation)
    return table


# --- updates ----------------------------------------------------------------------------

DEFAULT_UPDATE_URL = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)
"""LiteLLM's public table, the default of ``spendgate pricing update``."""
ABSURD_PER_MILLION = Decimal(20_000)
"""A price above this (USD per million tokens, $0.02 a token; the dearest model in the
public table charges $600) is refused without ``--force``: a unit slip, not a price."""
MAX_TABLE_BYTES = 64 << 20


def fetch_table(source: str, timeout: float = 60.0) -> tuple[bytes, str]:
    """The bytes of an http(s) URL or a file, and its name as recorded (URL or path)."""
    if re.match(r"^https?://", source, re.I):
        req = urllib.request.Request(source, headers={"User-Agent": f"spendgate/{__version__}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body: bytes = resp.read(MAX_TABLE_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise PricingError(f"cannot fetch {source}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PricingError(f"cannot fetch {source}: {reason}") from e
        origin = source
    else:
        path = Path(source).expanduser()
        try:
            body = path.read_bytes()
        except OSError as e:
            raise PricingError(f"cannot read {path}: {e.strerror or e}") from e
        origin = str(path.resolve())
    if len(body) > MAX_TABLE_BYTES:
        raise PricingError(f"{source}: larger than {MAX_TABLE_BYTES >> 20} MiB, not a price table")
    return body, origin


def _prices_of(price: ModelPrice) -> tuple[Any, ...]:
    return (*(getattr(price, f) for f in PRICE_FIELDS), price.tiers)


def _absurd(entry: Mapping[str, Any]) -> bool:
    for prices in [entry, *(entry.get("tiers") or [])]:
        for f in PRICE_FIELDS:
            value = to_decimal(prices.get(f))
            if value is not None and value > ABSURD_PER_MILLION:
                return True
    return False


def _show(price: ModelPrice) -> str:
    if not price.priced:
        return "no token prices"
    return f"${price.input} / ${price.output}"


@dataclass
class UpdatePlan:
    """What storing a fetched table would change in the public prices (bundled + update,
    without the user's file), and why it may be refused."""

    update: StoredUpdate
    sha256: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, ModelPrice, ModelPrice]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """Priced above $0 before; now $0, without token prices, or gone: (id, what now)."""
    absurd: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        """Stored only with ``force``."""
        return bool(self.dropped or self.absurd)

    def lines(self, limit: int | None = 20) -> list[str]:
        """The report ``spendgate pricing update`` prints (``limit`` ids per list)."""

        def some(ids: list[str]) -> str:
            shown = ids if limit is None else ids[:limit]
            more = len(ids) - len(shown)
            return ", ".join(shown) + (f", … and {more} more (--verbose)" if more else "")

        u = self.update
        out = [f"{u.origin}: {u.format} table, {len(u.models)} token-priced models"]
        out.append(f"added {len(self.added)}" + (f": {some(self.added)}" if self.added else ""))
        out.append(
            f"removed {len(self.removed)}" + (f": {some(self.removed)}" if self.removed else "")
        )
        out.append(f"changed prices {len(self.changed)}" + (":" if self.changed else ""))
        rows = self.changed if limit is None else self.changed[:limit]
        out += [f"  {k}: {_show(a)} → {_show(b)} per million" for k, a, b in rows]
        if len(rows) < len(self.changed):
            out.append(f"  … and {len(self.changed) - len(rows)} more (--verbose)")
        for key, now in self.dropped if limit is None else self.dropped[:limit]:
            out.append(f"REFUSED: {key} was priced and would be {now}")
        if limit is not None and len(self.dropped) > limit:
            out.append(f"REFUSED: … and {len(self.dropped) - limit} more (--verbose)")
        if self.absurd:
            out.append(
                f"REFUSED: prices above ${ABSURD_PER_MILLION} per million tokens: "
                f"{some(self.absurd)}"
            )
        return out


def plan_update(body: bytes, origin: str, current: Path | None = None) -> UpdatePlan:
    """Check a fetched table (LiteLLM, models.dev or spendgate format) and compare it with
    the stored update at ``current`` (if any) on top of the bundled table.

    Raises PricingError when it is not a price table or an entry is invalid (a negative
    price, an unknown field): that table is never stored, even with ``--force``.
    """
    try:
        data = json.loads(body, parse_float=Decimal)  # exact, as written
    except (ValueError, UnicodeDecodeError) as e:
        raise PricingError(f"{origin}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise PricingError(f"{origin}: a price table is a JSON object")
    fmt = detect_format(data)
    if fmt == "litellm":
        models = convert_litellm(data, api_ids=True)
    elif fmt == "models.dev":
        models = convert_models_dev(data)
    else:
        models = _spendgate_tables(data, origin)[0]
    if not models:
        raise PricingError(f"{origin}: no model priced per token")
    for key, entry in models.items():
        model_price(key, entry, origin)  # a negative price or a bad field: refused outright
    now = datetime.now(UTC)
    update = StoredUpdate(
        models, origin, now.date().isoformat(), now.isoformat(timespec="seconds"), fmt
    )
    before = {p.model: p for p in load_price_table(update_file=current)}
    after = {p.model: p for p in _table(update, None, None)}
    plan = UpdatePlan(update, hashlib.sha256(body).hexdigest())
    plan.absurd = sorted(k for k, e in models.items() if _absurd(e))
    for key in sorted(after.keys() | before.keys()):
        old, new = before.get(key), after.get(key)
        if old is None:
            plan.added.append(key)
            continue
        if new is None:
            plan.removed.append(key)
        elif _prices_of(old) != _prices_of(new):
            plan.changed.append((key, old, new))
        if old.priced and not old.free:
            if new is None:
                plan.dropped.append((key, "gone"))
            elif not new.priced:
                plan.dropped.append((key, "without token prices"))
            elif new.free:
                plan.dropped.append((key, "$0"))
    return plan


def store_update(plan: UpdatePlan, path: Path) -> None:
    """Write the table atomically (a reader never sees half a file)."""
    u = plan.update
    meta = {
        "_update": {
            "from": u.origin,
            "date": u.date,
            "fetched": u.fetched_at,
            "format": u.format,
            "sha256": plan.sha256,
            "models": len(u.models),
        }
    }
    attribution = (
        f"Fetched from {u.origin} on {u.date} by `spendgate pricing update` and converted to "
        "USD per million tokens; the source's license applies (LiteLLM's table: MIT, "
        "BerriAI/litellm)."
    )
    body = dumps_table(u.models, None, attribution, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".prices-update.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_into(source: Path, target: Path) -> int:
    """Merge a whole table (any supported format) into the user's JSON pricing file.

    Imported entries replace existing ones of the same id; the file's aliases are kept.
    Returns how many models were imported.
    """
    imported = import_table(source)
    models: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    if target.exists():
        if target.suffix.lower() == ".toml":
            raise PricingError(f"{target}: import writes JSON; choose a .json pricing file")
        models, aliases = read_price_file(target)
    models.update(imported)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(dumps_table(models, aliases, f"imported from {source.name}"))
    return len(imported)
