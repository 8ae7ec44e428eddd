"""Token counts in spendgate's own terms, shared by adapters, pricing and storage.

Every provider's usage block is mapped onto :class:`Usage` by its adapter. A field is
``None`` when the provider did not report it: "not reported" must never silently
become zero (docs/reference.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import NamedTuple

MAX_TOKENS = 10**10
"""The largest token count one usage field may report: ten thousand times the largest
context window of any model in the bundled price table. A field beyond it (``2**63``,
``1e300``) is not reported, like a negative or non-integer one (docs/reference.md §3),
so no row can hold a number that breaks the database or prices to an absurd sum."""

Note = Callable[[str], None]
"""Where a parser says what it refused or adjusted (the row's ``note``)."""


class Extras(NamedTuple):
    """What a response reports besides its token totals, each priced on its own
    (docs/reference.md §3 "Usage fields", §4 "Cost"). Made only for the responses that
    report any of it, so the common case costs nothing.

    The audio and image counts are parts of ``input_tokens`` / ``output_tokens`` (OpenAI
    ``prompt_tokens_details.audio_tokens``, Gemini's per-modality details), not extra
    tokens. ``tool_calls`` is (tool, calls) for the server-side tools the response ran
    (:data:`spendgate.pricing.TOOLS`). ``provider_cost`` is the USD the provider itself
    reports (OpenRouter ``usage.cost``).
    """

    service_tier: str | None = None
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    tool_calls: tuple[tuple[str, int], ...] = ()
    provider_cost: Decimal | None = None

    def within(self, input_tokens: int, output_tokens: int) -> Extras:
        """These extras with the modality counts held within the totals they are part of."""
        a_in = min(self.input_audio_tokens, input_tokens)
        i_in = min(self.input_image_tokens, input_tokens - a_in)
        a_out = min(self.output_audio_tokens, output_tokens)
        i_out = min(self.output_image_tokens, output_tokens - a_out)
        fixed = self._replace(
            input_audio_tokens=a_in,
            input_image_tokens=i_in,
            output_audio_tokens=a_out,
            output_image_tokens=i_out,
        )
        return self if fixed == self else fixed


NO_EXTRAS = Extras()
"""A response that reported nothing besides its tokens."""


class Usage(NamedTuple):
    """One response's tokens (a tuple: made for every response, so it must be cheap).

    ``input_tokens`` counts *all* prompt tokens, cache reads and cache writes included;
    ``output_tokens`` counts all generated tokens, reasoning included. The breakdowns
    (``cached_input_tokens``, ``cache_write_tokens``, ``reasoning_tokens``) are subsets.
    ``cache_write_1h_tokens`` is the part of ``cache_write_tokens`` written with a
    one-hour TTL (Anthropic), priced differently.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    reasoning_tokens: int | None = None
    extras: Extras | None = None
    """Service tier, audio and image tokens, tool calls, the provider's own cost."""

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    def counts(self) -> TokenCounts:
        """The integer view stored and emitted, with "not reported" as 0."""
        inp, out = self.input_tokens or 0, self.output_tokens or 0
        extras = self.extras
        return TokenCounts(
            input_tokens=inp,
            output_tokens=out,
            cached_input_tokens=self.cached_input_tokens or 0,
            cache_write_tokens=self.cache_write_tokens or 0,
            cache_write_1h_tokens=self.cache_write_1h_tokens or 0,
            reasoning_tokens=self.reasoning_tokens or 0,
            extras=None if extras is None else extras.within(inp, out),
        )


class TokenCounts(NamedTuple):
    """Integer token fields as they are stored, emitted and priced."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    extras: Extras | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cached_input_tokens - self.cache_write_tokens)

    def within_input(self) -> TokenCounts:
        """These counts with the breakdowns clamped as :func:`consistent` clamps them
        (for estimates, whose input may be an estimate while the breakdowns are reported)."""
        inp, out, cached, write, write_1h, reasoning, extras = self
        cached = min(cached, inp)
        write = min(write, inp - cached)
        if extras is not None:
            extras = extras.within(inp, out)
        fixed = TokenCounts(
            inp, out, cached, write, min(write_1h, write), min(reasoning, out), extras
        )
        return self if fixed == self else fixed


def consistent(usage: Usage, note: Note) -> Usage:
    """``usage`` with each breakdown at most what it breaks down, each fix noted.

    On the normalized form (every adapter's input already includes cache reads and
    writes): ``cached_input_tokens + cache_write_tokens <= input_tokens`` (reads first,
    writes get what is left), ``cache_write_1h_tokens <= cache_write_tokens`` and
    ``reasoning_tokens <= output_tokens``. Anthropic's input is the sum of its three
    fields, so it always holds there; OpenAI's and Gemini's cached tokens are part of
    the prompt count, so a report of more cached tokens than prompt tokens is clamped.
    A breakdown whose total was not reported is left as it is (an estimate clamps it,
    :func:`spendgate.billing.estimated_counts`).
    """
    inp, out, cached, write, write_1h, reasoning, extras = usage
    if cached is None and write is None and reasoning is None and extras is None:
        return usage  # nearly every report: nothing to compare
    if inp is not None:
        if cached is not None and cached > inp:
            note(f"cached tokens beyond the input: {cached} > {inp}, clamped to {inp}")
            cached = inp
        room = inp - (cached or 0)
        if write is not None and write > room:
            note(f"cache writes beyond the input: {write} > {room}, clamped to {room}")
            write = room
    if write is not None and write_1h is not None and write_1h > write:
        note(f"1-hour cache writes beyond the cache writes: {write_1h} > {write}, clamped")
        write_1h = write
    if extras is not None and inp is not None and out is not None:
        held = extras.within(inp, out)
        if held != extras:
            note(f"audio/image tokens beyond the totals they are part of, clamped: {held}")
            extras = held
    if out is not None and reasoning is not None and reasoning > out:
        note(f"reasoning tokens beyond the output: {reasoning} > {out}, clamped to {out}")
        reasoning = out
    fixed = Usage(inp, out, cached, write, write_1h, reasoning, extras)
    return usage if fixed == usage else fixed


def estimate_tokens(chars: int) -> int:
    """Rough token count for text of ``chars`` characters (about four per token).

    Used only for live updates, reservations and responses that never report usage;
    such numbers are always flagged ``estimated``.
    """
    return (chars + 3) // 4
