"""Which token counts a response is billed for: the provider's numbers, or estimates
(docs/reference.md §3).

Pure functions of what the meter saw, so the rules are tested on their own
(tests/test_billing.py): the provider's report wins when the response completed and
reported both input and output; a response that ended early (client hang-up, upstream
break, budget cut) or reported nothing is billed on estimates, flagged as such; an
error status is billed only for what the provider reported; an unmetered operation or
a request that never reached an upstream answer bills nothing.
"""

from __future__ import annotations

from spendgate.providers._api import RequestInfo
from spendgate.usage import TokenCounts, Usage, estimate_tokens

NOTHING = TokenCounts()


def estimated_counts(info: RequestInfo, reported: Usage | None, output_chars: int) -> TokenCounts:
    """Estimates from the request size and the deltas streamed so far, with whatever
    the provider did report taking precedence over its estimate. Reported breakdowns are
    held within the totals here too (an estimated input may be smaller than the cached
    tokens reported beside it): :meth:`TokenCounts.within_input`."""
    out = estimate_tokens(output_chars)
    if reported is None:
        return TokenCounts(input_tokens=estimate_tokens(info.input_chars), output_tokens=out)
    return TokenCounts(
        input_tokens=reported.input_tokens or estimate_tokens(info.input_chars),
        output_tokens=max(reported.output_tokens or 0, out),
        cached_input_tokens=reported.cached_input_tokens or 0,
        cache_write_tokens=reported.cache_write_tokens or 0,
        cache_write_1h_tokens=reported.cache_write_1h_tokens or 0,
        reasoning_tokens=reported.reasoning_tokens or 0,
        extras=reported.extras,
    ).within_input()


def billed_counts(
    info: RequestInfo, status: int, complete: bool, reported: Usage | None
) -> TokenCounts | None:
    """The numbers to bill when no estimate is needed, else None (then bill
    :func:`estimated_counts`, flagged as estimates).

    ``status`` 0 means no upstream answer; ``complete`` is False when the body ended
    early (the client left, the upstream broke off, or the budget cut it). Deciding
    this first matters for speed: an estimate needs every streamed delta counted,
    which a complete stream that reported its usage never needs.
    """
    if not info.metered or status == 0:
        return NOTHING
    if status >= 400:
        return reported.counts() if reported else NOTHING
    if (
        complete
        and reported is not None
        and reported.input_tokens is not None
        and reported.output_tokens is not None
    ):
        return reported.counts()
    return None
