"""Model prices: entries, the table, model-id resolution and cost (docs/reference.md §4).

Prices are USD per *million* tokens held as :class:`~decimal.Decimal`; floats appear
only at the JSON edge (``to_json``). An unknown model prices to ``None``, never to 0,
so a missing price can never pass for a free request.

Reading and writing price files (and the bundled table) is :mod:`spendgate.price_files`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from spendgate.usage import TokenCounts

log = logging.getLogger("spendgate.pricing")

MILLION = Decimal(1_000_000)
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
ENTRY_FIELDS = frozenset(
    {*PRICE_FIELDS, "provider", "tiers", "context_window", "max_output_tokens"}
)
BUNDLED = "bundled"

# Resolution caches are keyed by client-supplied model names; bound them.
_CACHE_LIMIT = 10_000


class PricingError(ValueError):
    """A price file or entry that cannot be used; the message names file and model."""


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Prices that apply once a request's input exceeds ``above_input_tokens``.

    ``None`` means "same as the base price" for that field.
    """

    above_input_tokens: int
    input: Decimal | None = None
    output: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None

    def to_json(self) -> dict[str, Any]:
        return {"aboveInputTokens": self.above_input_tokens, **_prices_json(self)}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices (USD per million tokens) and limits."""

    model: str
    provider: str | None = None
    input: Decimal | None = None
    output: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    tiers: tuple[PriceTier, ...] = ()
    """Sorted by ``above_input_tokens``, lowest first."""
    context_window: int | None = None
    """The model's ``max_input_tokens``."""
    max_output_tokens: int | None = None
    source: str = BUNDLED
    """``bundled`` or the path of the user's price file that set this entry."""

    @property
    def priced(self) -> bool:
        """Whether both token prices are known; without them cost is unknown, not 0."""
        return self.input is not None and self.output is not None

    def cost(self, counts: TokenCounts) -> Decimal | None:
        """USD for ``counts``; reasoning is part of output and billed once."""
        base_in, base_out = self.input, self.output
        if base_in is None or base_out is None:
            return None
        inp, out = base_in, base_out
        cached, write, write_1h = self.cached_input, self.cache_write, self.cache_write_1h
        tier = self._tier(counts.input_tokens) if self.tiers else None
        if tier is not None:
            inp = base_in if tier.input is None else tier.input
            out = base_out if tier.output is None else tier.output
            cached = cached if tier.cached_input is None else tier.cached_input
            write = write if tier.cache_write is None else tier.cache_write
            write_1h = write_1h if tier.cache_write_1h is None else tier.cache_write_1h
        # Missing cache prices fall back to what the provider would otherwise charge.
        cached = inp if cached is None else cached
        write = inp if write is None else write
        write_1h = write if write_1h is None else write_1h
        total = counts.uncached_input_tokens * inp + counts.output_tokens * out
        if counts.cached_input_tokens:
            total += counts.cached_input_tokens * cached
        if counts.cache_write_tokens:
            writes_1h = min(counts.cache_write_1h_tokens, counts.cache_write_tokens)
            total += (counts.cache_write_tokens - writes_1h) * write + writes_1h * write_1h
        return total / MILLION

    def reserve_cost(self, input_tokens: int, output_tokens: int) -> Decimal | None:
        """Estimated USD held against a budget while a request runs (all input uncached)."""
        return self.cost(TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens))

    def _tier(self, input_tokens: int) -> PriceTier | None:
        chosen = None
        for tier in self.tiers:
            if input_tokens > tier.above_input_tokens:
                chosen = tier
            else:
                break
        return chosen

    def to_json(self) -> dict[str, Any]:
        """The ``GET /api/pricing`` shape: camelCase keys, prices as floats."""
        return {
            "model": self.model,
            "provider": self.provider,
            **_prices_json(self),
            "tiers": [t.to_json() for t in self.tiers],
            "contextWindow": self.context_window,
            "maxOutputTokens": self.max_output_tokens,
            "source": self.source,
        }


def _prices_json(p: PriceTier | ModelPrice) -> dict[str, float | None]:
    def f(d: Decimal | None) -> float | None:
        return None if d is None else float(d)

    return {
        "input": f(p.input),
        "output": f(p.output),
        "cachedInput": f(p.cached_input),
        "cacheWrite": f(p.cache_write),
        "cacheWrite1h": f(p.cache_write_1h),
    }


# --- resolution --------------------------------------------------------------------

# gpt-4o-2024-08-06, claude-3-5-sonnet-20240620, gpt-4-0613, gemini-2.0-flash-001
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4})$")


def _without_prefixes(model: str) -> list[str]:
    """``openai/gpt-4o`` → ``gpt-4o``; ``a/b/c`` → ``b/c``, ``c`` (models/…, groq/…)."""
    parts = model.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts)) if parts[i]]


def _without_suffix(name: str) -> list[str]:
    """Dated/tagged ids to try after the exact one, most specific first."""
    if name.startswith("ft:"):
        # ft:gpt-4o-2024-08-06:org:name:id is priced by its base snapshot's ft: entry.
        parts = name.split(":")
        return [":".join(parts[:2])] if len(parts) > 2 else []
    out: list[str] = []
    base = name
    if "@" in name:  # Vertex style: claude-3-5-sonnet@20240620
        base, _, tail = name.partition("@")
        out += [f"{base}-{tail}", base]
    elif ":" in name:  # Ollama tag: llama3:latest, qwen2.5-coder:7b
        base = name.partition(":")[0]
        out.append(base)
    m = _DATE_SUFFIX.search(base)
    if m:
        out.append(base[: m.start()])
    return out


class PriceTable:
    """Prices by model id, resolved as docs/reference.md §4 says, cached per (model, provider)."""

    def __init__(
        self, prices: Mapping[str, ModelPrice], aliases: Mapping[str, str] | None = None
    ) -> None:
        self._prices = dict(prices)
        self._aliases = dict(aliases or {})
        self._cache: dict[tuple[str, str | None], ModelPrice | None] = {}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._prices)

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(self._prices.values())

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def get(self, model: str) -> ModelPrice | None:
        """The entry stored under exactly ``model`` (no resolution)."""
        return self._prices.get(model)

    @property
    def aliases(self) -> Mapping[str, str]:
        return self._aliases

    def resolve(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """Exact id, then without provider prefix, then without date suffix, then aliases."""
        key = (model, provider)
        try:
            return self._cache[key]
        except KeyError:
            pass
        name = model.strip()
        price = self._lookup(name, provider) or self._alias(name, provider)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = price
        return price

    def _candidates(self, model: str) -> list[str]:
        names = [model, *_without_prefixes(model)]
        names += [v for n in names for v in _without_suffix(n)]
        return names

    def _find(self, name: str, provider: str | None) -> ModelPrice | None:
        if provider:
            hit = self._prices.get(f"{provider}/{name}")
            if hit is not None:
                return hit
        return self._prices.get(name)

    def _lookup(self, model: str, provider: str | None) -> ModelPrice | None:
        if not model:
            return None
        for name in self._candidates(model):
            hit = self._find(name, provider)
            if hit is not None:
                return hit
        return None

    def _alias(self, model: str, provider: str | None) -> ModelPrice | None:
        if not model:
            return None
        for name in self._candidates(model):
            target = self._aliases.get(name)
            if target is not None:
                hit = self._lookup(target, provider)
                if hit is not None:
                    return hit
        return None

    def priced(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model`` if both token prices are known; else None, logged once."""
        price = self.resolve(model, provider)
        if price is not None and price.priced:
            return price
        if model not in self._warned and len(self._warned) < _CACHE_LIMIT:
            self._warned.add(model)
            why = "has no price" if price is None else f"entry {price.model!r} lacks token prices"
            log.warning(
                "model %r %s; its cost is recorded as unknown (add it to your pricing file)",
                model,
                why,
            )
        return None

    def cost(self, model: str, counts: TokenCounts, provider: str | None = None) -> Decimal | None:
        """USD for one response, or None when the model's price is unknown."""
        price = self.priced(model, provider)
        return None if price is None else price.cost(counts)

    def reserve_cost(
        self, model: str, input_tokens: int, output_tokens: int, provider: str | None = None
    ) -> Decimal | None:
        """Estimated USD held against a budget while a request runs (all input uncached)."""
        price = self.priced(model, provider)
        return None if price is None else price.reserve_cost(input_tokens, output_tokens)


# --- numbers ------------------------------------------------------------------------


def normalize(d: Decimal) -> Decimal:
    """Shortest exact form without exponent notation for whole numbers (1E+2 → 100)."""
    d = d.normalize()
    exponent = d.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0 and d.adjusted() < 28:
        return d.quantize(Decimal(1))
    return d


def to_decimal(value: object) -> Decimal | None:
    """An exact Decimal for a JSON/TOML number or numeric string; None if not a number.

    Floats go through ``repr`` (their shortest round-trip form), so ``2.5e-06`` becomes
    exactly ``0.0000025`` rather than the binary float's expansion.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        d = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            return None
    else:
        return None
    return d if d.is_finite() else None


def per_million(per_token: object) -> Decimal | None:
    """USD per token → USD per million tokens, exactly (``1.25e-07`` → ``0.125``)."""
    d = to_decimal(per_token)
    return None if d is None else normalize(d * MILLION)


def _price(value: object, where: str, field: str) -> Decimal | None:
    if value is None:
        return None
    d = to_decimal(value)
    if d is None or d < 0:
        raise PricingError(f"{where}: {field} must be a non-negative number, got {value!r}")
    return normalize(d)


def _count(value: object, where: str, field: str) -> int | None:
    if value is None:
        return None
    d = to_decimal(value)
    if d is None or d < 0 or d != d.to_integral_value():
        raise PricingError(f"{where}: {field} must be a whole number of tokens, got {value!r}")
    return int(d)


# --- entries ------------------------------------------------------------------------


def model_price(model: str, raw: Mapping[str, Any], source: str = BUNDLED) -> ModelPrice:
    """Validate one entry in spendgate's format (per-million prices) into a ModelPrice.

    Keys starting with ``_`` are comments (``_derived_from``); other unknown keys are
    errors, so a typo such as ``ouput`` cannot silently leave a price unset.
    """
    where = f"{source}: model {model!r}"
    unknown = sorted(k for k in raw if k not in ENTRY_FIELDS and not str(k).startswith("_"))
    if unknown:
        raise PricingError(f"{where}: unknown field(s) {', '.join(unknown)}")
    provider = raw.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise PricingError(f"{where}: provider must be a string")
    raw_tiers = raw.get("tiers") or []
    if not isinstance(raw_tiers, list):
        raise PricingError(f"{where}: tiers must be a list")
    tiers = []
    for t in raw_tiers:
        if not isinstance(t, Mapping):
            raise PricingError(f"{where}: each tier must be a table")
        bad = sorted(k for k in t if k not in {*PRICE_FIELDS, "above_input_tokens"})
        if bad:
            raise PricingError(f"{where}: unknown tier field(s) {', '.join(bad)}")
        above = _count(t.get("above_input_tokens"), where, "tier above_input_tokens")
        if above is None:
            raise PricingError(f"{where}: a tier needs above_input_tokens")
        prices = {f: _price(t.get(f), where, f"tier {f}") for f in PRICE_FIELDS}
        tiers.append(PriceTier(above, **prices))
    tiers.sort(key=lambda t: t.above_input_tokens)
    return ModelPrice(
        model=model,
        provider=provider,
        **{f: _price(raw.get(f), where, f) for f in PRICE_FIELDS},
        tiers=tuple(tiers),
        context_window=_count(raw.get("context_window"), where, "context_window"),
        max_output_tokens=_count(raw.get("max_output_tokens"), where, "max_output_tokens"),
        source=source,
    )
