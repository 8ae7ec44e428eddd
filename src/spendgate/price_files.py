"""Price files: spendgate's own (TOML or JSON), LiteLLM's and models.dev's tables.

Reading turns any of the three into spendgate entries (USD per million tokens, exact
Decimals) checked by :func:`~spendgate.pricing.model_price`; writing produces the JSON
that ``spendgate pricing import`` and ``scripts/build_prices.py`` keep. The table the
proxy prices with is :func:`load_price_table`: bundled, then the user's file, then aliases.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from spendgate.pricing import (
    BUNDLED,
    PriceTable,
    PricingError,
    model_price,
    normalize,
    per_million,
    to_decimal,
)

# --- foreign formats ----------------------------------------------------------------

_LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}
_LITELLM_TIER = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost|cache_creation_input_token_cost_above_1hr)"
    r"_above_(\d+)k_tokens$"
)


def _positive_int(value: object) -> int | None:
    d = to_decimal(value)
    if d is None or d <= 0 or d != d.to_integral_value():
        return None
    return int(d)


def _litellm_entry(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    entry: dict[str, Any] = {}
    for src, dst in _LITELLM_FIELDS.items():
        value = per_million(spec.get(src))
        if value is not None:
            entry[dst] = value
    if "input" not in entry and "output" not in entry:
        return None  # priced per image/second/query: nothing spendgate can meter
    if spec.get("mode") == "embedding" and "output" not in entry:
        entry["output"] = Decimal(0)  # embeddings generate no tokens
    tiers: dict[int, dict[str, Any]] = {}
    for key, value in spec.items():
        m = _LITELLM_TIER.match(key)
        price = per_million(value) if m else None
        if m and price is not None:
            above = int(m.group(2)) * 1000
            tiers.setdefault(above, {"above_input_tokens": above})[_LITELLM_FIELDS[m[1]]] = price
    if tiers:
        entry["tiers"] = [tiers[k] for k in sorted(tiers)]
    if isinstance(spec.get("litellm_provider"), str):
        entry["provider"] = spec["litellm_provider"]
    if (window := _positive_int(spec.get("max_input_tokens"))) is not None:
        entry["context_window"] = window
    if (max_out := _positive_int(spec.get("max_output_tokens"))) is not None:
        entry["max_output_tokens"] = max_out
    return entry


def convert_litellm(data: Mapping[str, Any], *, api_ids: bool = False) -> dict[str, dict[str, Any]]:
    """LiteLLM's ``model_prices_and_context_window.json`` (USD per token) → spendgate entries.

    Entries priced only per image, second or query are skipped, as is ``sample_spec``.
    ``*_above_NNNk_tokens`` prices become a tier above NNN,000 input tokens. With
    ``api_ids``, Gemini API entries (``gemini/<id>``) are keyed ``<id>``, as that API
    names its models, replacing LiteLLM's same-named Vertex AI entry.
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
    out.update(gemini)
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
) -> bytes:
    """A price file in spendgate's JSON format; prices read back exactly."""
    doc: dict[str, Any] = {}
    if attribution:
        doc["_attribution"] = attribution
    doc["models"] = models
    if aliases:
        doc["aliases"] = aliases
    return (
        orjson.dumps(doc, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
    )


@lru_cache(maxsize=1)
def _bundled() -> tuple[Mapping[str, Mapping[str, Any]], Mapping[str, str]]:
    raw = resources.files("spendgate").joinpath("data", "prices.json").read_bytes()
    data = orjson.loads(raw)
    return _spendgate_tables(data, BUNDLED)


def bundled_attribution() -> str:
    """Where the bundled prices came from (shown by ``spendgate pricing``)."""
    raw = resources.files("spendgate").joinpath("data", "prices.json").read_bytes()
    text = orjson.loads(raw).get("_attribution", "")
    return str(text)


def load_price_table(
    user_file: Path | None = None, aliases: Mapping[str, str] | None = None
) -> PriceTable:
    """The effective table: bundled prices, then the user's file, then configured aliases.

    A user entry for a bundled model overrides only the fields it sets, so
    ``[models."gpt-4o"] input = 2.0`` keeps the bundled output and cache prices.
    """
    bundled_models, bundled_aliases = _bundled()
    raws: dict[str, tuple[Mapping[str, Any], str]] = {
        k: (v, BUNDLED) for k, v in bundled_models.items()
    }
    all_aliases = dict(bundled_aliases)
    if user_file is not None:
        user_models, user_aliases = read_price_file(user_file)
        for key, override in user_models.items():
            base = raws.get(key, ({}, BUNDLED))[0]
            raws[key] = ({**base, **override}, str(user_file))
        all_aliases.update(user_aliases)
    all_aliases.update(aliases or {})
    prices = {key: model_price(key, raw, source) for key, (raw, source) in raws.items()}
    return PriceTable(prices, all_aliases)


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
