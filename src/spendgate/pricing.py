"""Model prices: entries, the table, model-id resolution and cost (docs/reference.md §4).

Prices are USD per *million* tokens held as :class:`~decimal.Decimal`; floats appear
only at the JSON edge (``to_json``). An unknown model prices to ``None``, never to 0,
so a missing price can never pass for a free request.

Reading and writing price files (and the bundled table) is :mod:`spendgate.price_files`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from spendgate.usage import TokenCounts

log = logging.getLogger("spendgate.pricing")

MILLION = Decimal(1_000_000)
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
TOOLS = ("web_search", "file_search", "code_interpreter", "code_execution")
"""Server-side tools billed per call (``tool_fees``, docs/reference.md §4)."""
MODALITY_FIELDS = ("input_audio", "output_audio", "input_image", "output_image")
"""Prices of audio and image tokens (USD per million; missing: the text price)."""
TIER_FIELDS = frozenset({*PRICE_FIELDS, *MODALITY_FIELDS, "tiers"})
"""What a service tier (``service_tiers.flex``) may set: its own prices."""
ENTRY_FIELDS = frozenset(
    {
        *TIER_FIELDS,
        "provider",
        "context_window",
        "max_output_tokens",
        "tool_fees",
        "service_tiers",
    }
)
STANDARD_TIERS = frozenset({"default", "standard", "auto", "on_demand", "scale"})
"""Service tiers billed at an entry's own prices: OpenAI ``default`` (``auto`` resolves
to it; Scale Tier is prepaid capacity billed at the standard rate), Anthropic and Gemini
``standard``."""
_TIER_SPELLINGS = {"batches": "batch"}
"""Reported or LiteLLM spellings of a tier → its key in ``service_tiers``."""


def tier_key(tier: str) -> str:
    """The ``service_tiers`` key of a reported tier (lower case; ``batches`` → ``batch``)."""
    tier = tier.lower()
    return _TIER_SPELLINGS.get(tier, tier)


BUNDLED = "bundled"
"""``ModelPrice.source`` of the table shipped with spendgate (src/spendgate/data)."""
UPDATE = "update"
"""``ModelPrice.source`` of a table fetched by ``spendgate pricing update``."""
LOCAL = "local"
"""``ModelPrice.source`` of the $0 price of a local route's model (no entry priced it)."""
OVERRIDES = "overrides"
"""``ModelPrice.source`` of an entry only the shipped overrides file
(src/spendgate/data/price_overrides.json) has."""
_ZERO = Decimal(0)

# Resolution caches are keyed by client-supplied model names; bound them.
_CACHE_LIMIT = 10_000


PROVIDER = "provider"
"""``priceSource`` of a row whose cost is the one the provider reported (§4)."""


class Charge(NamedTuple):
    """What one response costs and how it was priced: the row's cost columns
    (docs/reference.md §4 "How it was priced", §5)."""

    cost: Decimal | None
    """``costUsd``: the provider's reported cost where the route takes it, else ``table``."""
    table: Decimal | None
    """``tableCostUsd``: the table's figure, tool fees included (None: unpriced)."""
    tools: Decimal | None
    """``toolCostUsd``: the per-call fees in ``table``."""
    priced_as: str | None
    price_source: str | None


UNPRICED = Charge(None, None, None, None, None)


def charge(price: ModelPrice | None, counts: TokenCounts, *, reported_cost: bool) -> Charge:
    """The charge for ``counts`` at ``price``; on a route that takes the provider's own
    figure (``reported_cost``, OpenRouter's by default) a reported ``usage.cost`` is the
    cost, with the table's beside it and ``priceSource`` ``provider``."""
    extras = counts.extras
    if extras is None and price is not None:  # nearly every response: tokens at the table
        table = price.token_cost(counts)
        tools = None if table is None else _ZERO  # tool_cost without extras, uncalled
        return Charge(table, table, tools, price.priced_as, price._price_source)
    reported = None if extras is None or not reported_cost else extras.provider_cost
    if price is None:
        return UNPRICED if reported is None else Charge(reported, None, None, None, PROVIDER)
    table = price.cost(counts)
    tools = None if table is None else price.tool_cost(counts)
    if reported is not None:
        return Charge(reported, table, tools, price.priced_as, PROVIDER)
    return Charge(table, table, tools, price.priced_as, price.price_source)


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
    tool_fees: Mapping[str, Decimal] = field(default_factory=dict)
    """USD per call of each server-side tool (:data:`TOOLS`), not per million."""
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None
    service_tiers: Mapping[str, ModelPrice] = field(default_factory=dict)
    """The prices of each non-standard service tier (``flex``, ``priority``, ``batch``),
    each a whole entry (its missing fields are this entry's)."""
    source: str = BUNDLED
    """``bundled``, ``update``, ``overrides``, ``local`` or the path of the user's price
    file that set this entry."""
    source_date: str | None = None
    """The date (YYYY-MM-DD) of the bundled table, the update or the overrides file that
    set this entry."""
    overrides_date: str | None = None
    """The overrides file's date when it filled in fields the table's entry lacked."""
    _price_source: str = field(init=False, repr=False, compare=False)
    """:attr:`price_source`, made once: every priced row carries it (§4)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_price_source", self._source_text())

    @property
    def priced(self) -> bool:
        """Whether both token prices are known; without them cost is unknown, not 0."""
        return self.input is not None and self.output is not None

    @property
    def free(self) -> bool:
        """Both token prices known and 0."""
        return self.input == _ZERO and self.output == _ZERO

    @property
    def from_user_file(self) -> bool:
        return self.source not in (BUNDLED, UPDATE, OVERRIDES, LOCAL)

    @property
    def priced_as(self) -> str:
        """``pricedAs``: the id of the entry that priced the model (``model``)."""
        return self.model

    @property
    def price_source(self) -> str:
        """``priceSource``: ``bundled 2026-11-22``, ``update 2026-12-01``,
        ``file /path/to/pricing.toml`` or ``local`` (a local route, §4)."""
        return self._price_source

    def _source_text(self) -> str:
        if self.from_user_file:
            return f"file {self.source}"
        base = self.source if self.source_date is None else f"{self.source} {self.source_date}"
        return (
            base if self.overrides_date is None else f"{base} + {OVERRIDES} {self.overrides_date}"
        )

    def for_tier(self, tier: str | None) -> ModelPrice:
        """The prices of service tier ``tier`` (a reported one): its own entry in
        ``service_tiers``, else these (a standard tier, or one the table has no price
        for)."""
        if tier is None or not self.service_tiers:
            return self
        return self.service_tiers.get(tier_key(tier), self)

    def cost(self, counts: TokenCounts) -> Decimal | None:
        """USD for ``counts``: its tokens at its service tier's prices plus the per-call
        fees of the tools it ran (docs/reference.md §4 "Cost"); reasoning is part of
        output and billed once."""
        extras = counts.extras
        if extras is None:
            return self.token_cost(counts)
        tokens = self.for_tier(extras.service_tier).token_cost(counts)
        return None if tokens is None else tokens + self.tool_cost(counts)

    def tool_cost(self, counts: TokenCounts) -> Decimal:
        """USD of the per-call fees in ``counts`` (``toolCostUsd``); a tool without a
        fee in the table or the overrides costs nothing beyond its tokens."""
        extras = counts.extras
        if extras is None or not extras.tool_calls:
            return _ZERO
        fees = self.tool_fees
        return sum((n * fees[t] for t, n in extras.tool_calls if t in fees), _ZERO)

    def token_cost(self, counts: TokenCounts) -> Decimal | None:
        """USD of the tokens in ``counts`` at these prices (no tier choice, no fees)."""
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
        extras = counts.extras
        if extras is not None:  # audio and image tokens at their own prices
            for n, price, text in (
                (extras.input_audio_tokens, self.input_audio, inp),
                (extras.input_image_tokens, self.input_image, inp),
                (extras.output_audio_tokens, self.output_audio, out),
                (extras.output_image_tokens, self.output_image, out),
            ):
                if n and price is not None:
                    total += n * (price - text)
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
            "toolFees": {k: float(v) for k, v in sorted(self.tool_fees.items())},
            **{_camel(f): _float(getattr(self, f)) for f in MODALITY_FIELDS},
            "serviceTiers": {
                name: {
                    **_prices_json(p),
                    **{_camel(f): _float(getattr(p, f)) for f in MODALITY_FIELDS},
                }
                for name, p in sorted(self.service_tiers.items())
            },
            "source": self.source,
            "pricedAs": self.priced_as,
            "priceSource": self.price_source,
        }


def _float(d: Decimal | None) -> float | None:
    return None if d is None else float(d)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _prices_json(p: PriceTier | ModelPrice) -> dict[str, float | None]:
    return {
        "input": _float(p.input),
        "output": _float(p.output),
        "cachedInput": _float(p.cached_input),
        "cacheWrite": _float(p.cache_write),
        "cacheWrite1h": _float(p.cache_write_1h),
    }


# --- resolution --------------------------------------------------------------------

# gpt-4o-2024-08-06, claude-3-5-sonnet-20240620, gpt-4-0613, gemini-2.0-flash-001
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4})$")

PREFIX_ORDER = (
    # the makers' own APIs
    "openai",
    "anthropic",
    "gemini",
    "xai",
    "mistral",
    "deepseek",
    "cohere",
    "ai21",
    "moonshot",
    "zai",
    "minimax",
    # clouds that list the makers' models at the makers' prices
    "vertex_ai",
    "azure",
    "bedrock",
    "azure_ai",
    # the router
    "openrouter",
)
"""The order in which entries under another provider's prefix are tried when the table
has no first-party entry for a model (docs/reference.md §4); any other prefix follows,
in alphabetical order."""
_PREFIX_RANK = {p: i for i, p in enumerate(PREFIX_ORDER)}

# Bedrock's own ids: anthropic.claude-3-haiku-20240307-v1:0 is claude-3-haiku-20240307.
_BEDROCK_ID = re.compile(
    r"^(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek|openai|qwen)\.(.+?)"
    r"(?:-v\d+(?::\d+)?)?$"
)
_VERSION_DOT = re.compile(r"(?<=\d)\.(?=\d)")


def spelling(name: str) -> str:
    """The form under which ids are matched across providers: lower case, a version's
    dots as dashes, a Vertex ``@date`` as ``-date`` (``claude-sonnet-4.5`` and
    ``claude-sonnet-4-5`` are one model; ``claude-3-haiku@20240307`` is
    ``claude-3-haiku-20240307``)."""
    return _VERSION_DOT.sub("-", name.lower().replace("@", "-"))


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


def _candidates(model: str) -> list[str]:
    names = _qualified(model)
    names += [v for n in names for v in _without_suffix(n)]
    return list(dict.fromkeys(names))


def _qualified(model: str) -> list[str]:
    """The id and the id without its prefixes: one model, however qualified."""
    return [model, *_without_prefixes(model)]


_Rank = tuple[int, int, str]
_Index = dict[str, tuple[tuple[_Rank, ModelPrice], ...]]


def _spellings(key: str) -> Iterator[tuple[bool, str, _Rank]]:
    """The spellings an entry answers to after the exact ids: (first-party, spelling,
    rank). First-party entries are the unprefixed ones; the others rank by their prefix
    (:data:`PREFIX_ORDER`, then any other), then the shorter match, then the key."""
    parts = key.split("/")
    if len(parts) == 1:
        yield True, spelling(key), (0, 0, key)
        m = _BEDROCK_ID.match(key)
        if m:
            yield False, spelling(m[1]), (_PREFIX_RANK["bedrock"], 1, key)
        return
    rank = _PREFIX_RANK.get(parts[0], len(PREFIX_ORDER))
    for depth in range(1, len(parts)):
        rest = "/".join(parts[depth:])
        if rest:
            yield False, spelling(rest), (rank, depth, key)


def _spelling_indexes(prices: Mapping[str, ModelPrice]) -> tuple[_Index, _Index]:
    """(first-party entries, other providers' entries) by :func:`spelling`, ranked."""
    first: dict[str, list[tuple[_Rank, ModelPrice]]] = {}
    other: dict[str, list[tuple[_Rank, ModelPrice]]] = {}
    for key, price in prices.items():
        for first_party, name, rank in _spellings(key):
            (first if first_party else other).setdefault(name, []).append((rank, price))
    return (
        {n: tuple(sorted(v, key=lambda t: t[0])) for n, v in first.items()},
        {n: tuple(sorted(v, key=lambda t: t[0])) for n, v in other.items()},
    )


def _prefix(price: ModelPrice) -> str:
    return price.model.partition("/")[0] if "/" in price.model else ""


def _provider_first(hits: Sequence[ModelPrice], provider: str | None) -> Sequence[ModelPrice]:
    """The route's provider's own listings first (``together`` → ``together_ai/…``)."""
    if not provider:
        return hits
    own = [p for p in hits if _prefix(p).startswith(provider)]
    if not own:
        return hits
    return [*own, *(p for p in hits if not _prefix(p).startswith(provider))]


def _choose(steps: Iterable[tuple[Sequence[ModelPrice], bool]]) -> ModelPrice | None:
    """The first step's first entry with a price above $0; a $0 entry only when no entry
    of its step prices the model above 0, and never one from another provider's listing
    (``cross``). Your own file's entries count as written. Without any priced entry, the
    first entry met (it still gives a context window)."""
    unpriced = None
    for hits, cross in steps:
        free = None
        for price in hits:
            if not price.priced:
                unpriced = unpriced or price
            elif not price.free or price.from_user_file:
                return price
            elif free is None and not cross:
                free = price
        if free is not None:
            return free
    return unpriced


class PriceTable:
    """Prices by model id, resolved as docs/reference.md §4 says, cached per (model,
    provider[, local])."""

    def __init__(
        self,
        prices: Mapping[str, ModelPrice],
        aliases: Mapping[str, str] | None = None,
        sources: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self._prices = dict(prices)
        self._aliases = dict(aliases or {})
        self._first, self._other = _spelling_indexes(self._prices)
        self._sources = [dict(s) for s in sources]
        self._cache: dict[tuple[str, str | None], ModelPrice | None] = {}
        self._priced: dict[tuple[str, str | None, bool], ModelPrice | None] = {}
        self._warned: set[str] = set()
        self._generation = 0

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

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The layers the table was built from, lowest first (``spendgate pricing``)."""
        return [dict(s) for s in self._sources]

    def replace_with(self, other: PriceTable, generation: int = 0) -> bool:
        """Take ``other``'s entries, aliases and sources, and start new caches: what
        ``POST /api/pricing/reload`` and SIGHUP do. No await between the assignments, so
        no request sees half of it; a request already priced keeps the price it has.
        A reload older than the one already taken (``generation``) is ignored."""
        if generation and generation < self._generation:
            return False
        self._generation = max(generation, self._generation)
        self._prices, self._aliases = other._prices, other._aliases
        self._first, self._other, self._sources = other._first, other._other, other._sources
        self._cache, self._priced, self._warned = {}, {}, set()
        return True

    def resolve(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The entry ``model`` resolves to (priced or not): docs/reference.md §4."""
        key = (model, provider)
        try:
            return self._cache[key]
        except KeyError:
            pass
        name = model.strip()
        price = _choose(self._steps(name, provider)) if name else None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = price
        return price

    def _exact(
        self, names: Iterable[str], provider: str | None
    ) -> Iterator[tuple[Sequence[ModelPrice], bool]]:
        for name in names:
            hits = []
            if provider and (hit := self._prices.get(f"{provider}/{name}")) is not None:
                hits.append(hit)
            if (hit := self._prices.get(name)) is not None:
                hits.append(hit)
            if hits:
                yield hits, False

    def _respelled(
        self, names: Iterable[str], index: _Index, provider: str | None, cross: bool
    ) -> Iterator[tuple[Sequence[ModelPrice], bool]]:
        for name in names:
            hits = index.get(spelling(name))
            if hits:
                yield _provider_first([p for _, p in hits], provider), cross

    def _elsewhere(
        self, model: str, provider: str | None
    ) -> Iterator[tuple[Sequence[ModelPrice], bool]]:
        """Other providers' listings: of the id however qualified (``x-ai/grok-4.7``,
        ``grok-4.7``) as one step in rank order, then of each shorter form."""
        qualified = _qualified(model)
        ranked: dict[str, tuple[_Rank, ModelPrice]] = {}
        for name in qualified:
            for rank, price in self._other.get(spelling(name), ()):
                if price.model not in ranked or rank < ranked[price.model][0]:
                    ranked[price.model] = (rank, price)
        if ranked:
            hits = [p for _, p in sorted(ranked.values(), key=lambda t: t[0])]
            yield _provider_first(hits, provider), True
        shorter = [v for n in qualified for v in _without_suffix(n)]
        yield from self._respelled(dict.fromkeys(shorter), self._other, provider, True)

    def _steps(
        self, model: str, provider: str | None
    ) -> Iterator[tuple[Sequence[ModelPrice], bool]]:
        """Exact ids, aliases' targets, first-party entries spelled otherwise, then other
        providers' listings: each step a list of entries of equal standing."""
        names = _candidates(model)
        targets = list(dict.fromkeys(t for n in names if (t := self._aliases.get(n)) is not None))
        target_names = [c for t in targets for c in _candidates(t)]
        yield from self._exact(names, provider)
        yield from self._exact(target_names, provider)
        yield from self._respelled(names, self._first, provider, False)
        yield from self._respelled(target_names, self._first, provider, False)
        yield from self._elsewhere(model, provider)
        for target in targets:
            yield from self._elsewhere(target, provider)

    def priced(
        self, model: str, provider: str | None = None, *, local: bool = False
    ) -> ModelPrice | None:
        """The price the proxy charges ``model`` on a route of ``provider`` (``local``: a
        local route's, $0 unless ``provider/model`` has a price), if both token prices are
        known; else None, logged once. ``spendgate pricing`` and ``/api/pricing/{model}``
        ask exactly this."""
        key = (model, provider, local)
        try:
            return self._priced[key]
        except KeyError:
            pass
        price = self._local(model.strip(), provider) if local else self.resolve(model, provider)
        if price is not None and not price.priced:
            self._warn(model, f"entry {price.model!r} lacks token prices")
            price = None
        elif price is None:
            self._warn(model, "has no price")
        if len(self._priced) >= _CACHE_LIMIT:
            self._priced.clear()
        self._priced[key] = price
        return price

    def _local(self, model: str, provider: str | None) -> ModelPrice:
        """A local route's model: its own entry (``ollama/llama3``) if priced, else $0."""
        if provider:
            for name in _candidates(model):
                hit = self._prices.get(f"{provider}/{name}")
                if hit is not None and hit.priced:
                    return hit
        return ModelPrice(model=model, provider=provider, input=_ZERO, output=_ZERO, source=LOCAL)

    def _warn(self, model: str, why: str) -> None:
        if model not in self._warned and len(self._warned) < _CACHE_LIMIT:
            self._warned.add(model)
            log.warning(
                "model %r %s; its cost is recorded as unknown (add it to your pricing file)",
                model,
                why,
            )

    def cost(
        self,
        model: str,
        counts: TokenCounts,
        provider: str | None = None,
        *,
        local: bool = False,
    ) -> Decimal | None:
        """USD for one response, or None when the model's price is unknown."""
        price = self.priced(model, provider, local=local)
        return None if price is None else price.cost(counts)

    def reserve_cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        provider: str | None = None,
        *,
        local: bool = False,
    ) -> Decimal | None:
        """Estimated USD held against a budget while a request runs (all input uncached)."""
        price = self.priced(model, provider, local=local)
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


def _tool_fees(value: object, where: str) -> dict[str, Decimal]:
    """``tool_fees``: a table of :data:`TOOLS` to USD per call."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PricingError(f"{where}: tool_fees must be a table of tool = USD per call")
    unknown = sorted(str(k) for k in value if k not in TOOLS and not str(k).startswith("_"))
    if unknown:
        raise PricingError(
            f"{where}: unknown tool(s) in tool_fees: {', '.join(unknown)} "
            f"(known: {', '.join(TOOLS)})"
        )
    fees = {}
    for tool in TOOLS:
        fee = _price(value.get(tool), where, f"tool_fees.{tool}")
        if fee is not None:
            fees[tool] = fee
    return fees


def _service_tiers(
    model: str,
    raw: Mapping[str, Any],
    source: str,
    source_date: str | None,
    overrides_date: str | None,
) -> dict[str, ModelPrice]:
    """``service_tiers``: each tier a whole entry, its missing prices the entry's own (its
    long-context ``tiers`` are its own too: the entry's are not inherited)."""
    value = raw.get("service_tiers")
    if value is None:
        return {}
    where = f"{source}: model {model!r}"
    if not isinstance(value, Mapping):
        raise PricingError(f"{where}: service_tiers must be a table of tier = prices")
    base = {k: v for k, v in raw.items() if k != "service_tiers" and k != "tiers"}
    out = {}
    for name, prices in value.items():
        if not isinstance(prices, Mapping):
            raise PricingError(f"{where}: service_tiers.{name} must be a table of prices")
        key = tier_key(str(name))
        if key in STANDARD_TIERS:
            raise PricingError(f"{where}: service_tiers.{name} is the standard price itself")
        bad = sorted(str(k) for k in prices if k not in TIER_FIELDS and not str(k).startswith("_"))
        if bad:
            raise PricingError(
                f"{where}: unknown field(s) in service_tiers.{name}: {', '.join(bad)}"
            )
        merged = {**base, **prices}
        out[key] = model_price(model, merged, source, source_date, overrides_date)
    return out


def model_price(
    model: str,
    raw: Mapping[str, Any],
    source: str = BUNDLED,
    source_date: str | None = None,
    overrides_date: str | None = None,
) -> ModelPrice:
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
    p = {f: _price(raw.get(f), where, f) for f in (*PRICE_FIELDS, *MODALITY_FIELDS)}
    services = _service_tiers(model, raw, source, source_date, overrides_date)
    return ModelPrice(
        model=model,
        provider=provider,
        input=p["input"],
        output=p["output"],
        cached_input=p["cached_input"],
        cache_write=p["cache_write"],
        cache_write_1h=p["cache_write_1h"],
        tiers=tuple(tiers),
        context_window=_count(raw.get("context_window"), where, "context_window"),
        max_output_tokens=_count(raw.get("max_output_tokens"), where, "max_output_tokens"),
        tool_fees=_tool_fees(raw.get("tool_fees"), where),
        input_audio=p["input_audio"],
        output_audio=p["output_audio"],
        input_image=p["input_image"],
        output_image=p["output_image"],
        service_tiers=services,
        source=source,
        source_date=source_date,
        overrides_date=overrides_date,
    )
