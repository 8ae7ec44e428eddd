"""The adapter seam: what the proxy asks of a wire format, and nothing more.

An adapter knows one provider's JSON. It inspects a request before it goes upstream
(model, stream flag, output bound, the one permitted rewrite) and builds a fresh
:class:`ResponseParser` per response. Parsers are pure and incremental: bytes in,
usage out, no I/O, never raising into the proxy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

from spendgate.usage import Usage


class RequestInfo(NamedTuple):
    """What an adapter learned from a request body and path (a tuple: one is made per
    request, and a tuple is the cheapest immutable record to build)."""

    operation: str
    """Short operation name (``chat``, ``responses``, ``messages``, ...); ``"other"`` for a
    path nobody meters (model listings, ``count_tokens``, ...)."""
    model: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    """The request's bound on generated tokens per completion: the largest of every
    spelling it carries (``max_tokens`` and its equivalents), at most
    ``_common.MAX_OUTPUT_TOKENS``; None when it sets none."""
    choices: int = 1
    """Completions the request asks for (OpenAI ``n`` / ``best_of``, Gemini
    ``candidateCount``), 1 to ``_common.MAX_CHOICES``: each may generate up to
    ``max_output_tokens``, while the prompt is billed once."""
    input_chars: int = 0
    """Characters of prompt text, for estimates when the provider reports no usage (for
    an ``unread`` body: its length in bytes)."""
    unread: bool = False
    """The body could not be read as a JSON object, even leniently: model (unless the
    path names it), output bound and choices are unknown, so a reservation must assume
    the worst (``input_chars`` is the body's size, the default output bound applies)."""
    body: bytes = b""
    """The body to send upstream: the original bytes unless the adapter rewrote them."""
    strip_usage_chunk: bool = False
    """The proxy injected ``include_usage``; hide the usage-only chunk from the client."""
    service_tier: str | None = None
    """The service tier the request asks for (OpenAI ``service_tier``): its prices hold
    the reservation (docs/reference.md §6), the response's tier prices the row."""

    @property
    def metered(self) -> bool:
        """Is this an operation that bills tokens? (``"other"`` and ``""`` are not.)"""
        return self.operation != "other" and bool(self.operation)


class ResponseParser(Protocol):
    """Incremental parser of one response body (already decompressed)."""

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the body, split anywhere."""

    def close(self) -> None:
        """The body ended (or was cut short): ``usage`` and ``model`` are final. Counting
        ``output_chars`` may still be deferred: call ``settle`` before reading it."""

    def feed_whole(self, body: bytes) -> None:
        """The whole body at once, in place of ``feed`` then ``close``."""

    def settle(self) -> None:
        """Bring ``usage``, ``model`` and ``output_chars`` up to date, mid-stream or after
        ``close`` (a parser may hold bytes unexamined until asked). Only estimates need
        ``output_chars``, so only they pay for counting it."""

    @property
    def usage(self) -> Usage | None:
        """The latest usage the provider reported (the last report wins), or None."""

    @property
    def model(self) -> str | None:
        """The model the response names, once seen."""

    @property
    def output_chars(self) -> int:
        """Characters of generated deltas so far (text, tool arguments, reasoning)."""

    @property
    def notes(self) -> list[str]:
        """What the parser refused, adjusted or could not read (a usage count out of range,
        cached tokens clamped, an oversized event skipped), for the row's ``note``: each a
        short line ``kind: details``, at most ``MAX_NOTES`` distinct ones; usually none."""


MAX_NOTES = 4
"""Distinct notes one parser keeps: a stream repeating a bad count on every chunk, or a
new bad value each time, cannot grow the row's note."""


class OutputFilter(Protocol):
    """Rewrites the byte stream sent to the client (only for the include_usage rewrite)."""

    def feed(self, data: bytes) -> bytes: ...

    def close(self) -> bytes: ...


class Adapter(Protocol):
    """A wire format: request inspection plus a parser factory."""

    name: str
    error_style: str
    """Which provider error shape spendgate's own errors use: openai, anthropic, gemini, ollama."""

    def inspect(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        *,
        inject_stream_usage: bool,
    ) -> RequestInfo: ...

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser: ...

    def output_filter(self, info: RequestInfo) -> OutputFilter | None: ...


class BaseParser:
    """Shared state of the concrete parsers; subclasses implement ``feed``/``close``."""

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._model: str | None = None
        self._output_chars = 0
        self._notes: list[str] | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def model(self) -> str | None:
        return self._model

    @property
    def output_chars(self) -> int:
        return self._output_chars

    @property
    def notes(self) -> list[str]:
        return list(self._notes) if self._notes else []

    def _note(self, text: str) -> None:
        """Keep a note for the row (distinct ones, at most ``MAX_NOTES``)."""
        notes = self._notes
        if notes is None:
            self._notes = [text]
        elif text not in notes and len(notes) < MAX_NOTES:
            notes.append(text)

    def settle(self) -> None:
        pass  # nothing held back: every piece is examined as it arrives


class NullParser(BaseParser):
    """For responses nobody meters: counts nothing."""

    def feed(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def feed_whole(self, body: bytes) -> None:
        pass
