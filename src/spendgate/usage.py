"""Token counts in spendgate's own terms, shared by adapters, pricing and storage.

Every provider's usage block is mapped onto :class:`Usage` by its adapter. A field is
``None`` when the provider did not report it: "not reported" must never silently
become zero (docs/reference.md §3).
"""

from __future__ import annotations

from typing import NamedTuple


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

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    def counts(self) -> TokenCounts:
        """The integer view stored and emitted, with "not reported" as 0."""
        return TokenCounts(
            input_tokens=self.input_tokens or 0,
            output_tokens=self.output_tokens or 0,
            cached_input_tokens=self.cached_input_tokens or 0,
            cache_write_tokens=self.cache_write_tokens or 0,
            cache_write_1h_tokens=self.cache_write_1h_tokens or 0,
            reasoning_tokens=self.reasoning_tokens or 0,
        )


class TokenCounts(NamedTuple):
    """Integer token fields as they are stored, emitted and priced."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cached_input_tokens - self.cache_write_tokens)


def estimate_tokens(chars: int) -> int:
    """Rough token count for text of ``chars`` characters (about four per token).

    Used only for live updates, reservations and responses that never report usage;
    such numbers are always flagged ``estimated``.
    """
    return (chars + 3) // 4
