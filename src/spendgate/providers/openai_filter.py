"""Hiding the usage chunk spendgate asked for from the client that did not.

When :mod:`spendgate.providers.openai_request` adds ``include_usage`` to a streamed
chat request, OpenAI ends the stream with an extra event (``"choices": []`` and a usage
object) that the client never asked for and may choke on. This filter sits on the
bytes going to the client and removes exactly that event. It is apart from the parser
because it sees the other copy of the stream (the client's, not the meter's) and must
reproduce it byte for byte, where the parser only reads.
"""

from __future__ import annotations

import re

from spendgate.providers._common import loads_object

_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_OBJECT_VALUE = re.compile(rb"\s*:\s*\{")
_EMPTY_LIST_VALUE = re.compile(rb"\s*:\s*\[\s*\]")
_EMPTY_LIST = re.compile(rb"\[\s*\]")
_END_OVERLAP = 3
"""Bytes of the held-back tail scanned again for an event end: the longest end
(``\\r\\n\\r\\n``) is 4 bytes, so up to 3 of them may have come in the previous piece."""


def _has_key_with(block: bytes, key: bytes, value: re.Pattern[bytes]) -> bool:
    """Whether ``key`` occurs followed by a value matching ``value``: a byte-level probe,
    found at memchr speed. A false positive (the bytes inside a string) only costs the
    JSON parse that settles the question."""
    at = block.find(key)
    while at >= 0:
        if value.match(block, at + len(key)):
            return True
        at = block.find(key, at + 1)
    return False


def is_usage_only_event(block: bytes) -> bool:
    """True for the chunk ``include_usage`` adds: ``"choices": []`` and a usage object.

    With ``include_usage`` on, every chunk carries ``"usage":null``, so a byte scan for
    ``"usage"`` alone rejects nothing; the key scans below reject ordinary chunks
    without parsing JSON.
    """
    if not (
        _has_key_with(block, b'"usage"', _OBJECT_VALUE)
        and _has_key_with(block, b'"choices"', _EMPTY_LIST_VALUE)
    ):
        return False
    data = [
        line[6:] if line[5:6] == b" " else line[5:]
        for line in _LINE_END.split(block)
        if line.startswith(b"data:")
    ]
    obj = loads_object(b"\n".join(data))
    return obj is not None and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


MAX_PENDING = 1 << 16
"""Bytes of an unfinished event the filter holds back. The usage-only event is a few
hundred bytes, so a longer one cannot be it: past this the held bytes go to the client
and the rest of that event passes as it comes, so neither memory nor the copying of held
bytes grows with an event that never ends."""


class UsageChunkFilter:
    """Removes the usage-only SSE event from what the client receives.

    Every other byte passes unchanged (``[DONE]``, comments, CRLF framing). An event is
    held back only until its terminating blank line arrives, since whether to drop it
    is known only then, and only up to :data:`MAX_PENDING` bytes. A body that is not SSE
    (an error JSON) passes straight through.
    """

    __slots__ = ("_fast", "_passthrough", "_pending", "_tail")

    def __init__(self) -> None:
        self._pending = b""
        self._passthrough: bool | None = None
        self._fast = False
        """Known SSE and nothing held back: a piece of whole LF events may skip ``_feed``."""
        self._tail: bytes | None = None
        """Inside an event too long to hold: its last bytes passed on (to find its end
        across pieces), else None."""

    def feed(self, data: bytes) -> bytes:
        # The common piece passes as it is: it ends with a blank line (in LF or CRLF
        # framing, that ends an event), so nothing stays held back, and nothing in it
        # holds an empty list, so none of its events is the usage-only one.
        if self._fast and data[-2:] == b"\n\n" and _EMPTY_LIST.search(data) is None:
            return data
        out = self._feed(data)
        self._fast = self._passthrough is False and not self._pending and self._tail is None
        return out

    def _feed(self, data: bytes) -> bytes:
        if self._tail is not None:  # the rest of an event too long to hold passes as is
            cut = self._oversized_end(data)
            if cut < 0:
                return data
            return data[:cut] + self._feed(data[cut:])
        out = self._filter(data)
        if len(self._pending) > MAX_PENDING:
            held, self._pending = self._pending, b""
            self._tail = held[-_END_OVERLAP:]
            return out + held
        return out

    def _oversized_end(self, data: bytes) -> int:
        """Where the event too long to hold ends in ``data`` (the index after its blank
        line), or -1 while it goes on."""
        tail = self._tail or b""
        probe = tail + data
        m = _EVENT_END.search(probe)
        if m is None or (m.end() == len(probe) and probe[-1] == 0x0D):  # CR: maybe CRLF
            self._tail = probe[-_END_OVERLAP:]
            return -1
        self._tail = None
        return max(0, m.end() - len(tail))

    def _filter(self, data: bytes) -> bytes:
        if self._passthrough is None:
            head = (self._pending + data).lstrip()
            if head:
                self._passthrough = head[:1] in (b"{", b"[")
        if self._passthrough:
            out, self._pending = self._pending + data, b""
            return out
        buf = self._pending + data if self._pending else data
        if b"\r" not in buf:
            return self._feed_lf(buf)
        out_parts: list[bytes] = []
        emit_from = pos = 0
        for m in _EVENT_END.finditer(buf, max(0, len(self._pending) - _END_OVERLAP)):
            end = m.end()
            if end == len(buf) and buf[-1] == 0x0D:  # a CR may be half of a CRLF
                break
            if is_usage_only_event(buf[pos:end]):
                out_parts.append(buf[emit_from:pos])
                emit_from = end
            pos = end
        out_parts.append(buf[emit_from:pos])
        self._pending = buf[pos:]
        return b"".join(out_parts)

    def _feed_lf(self, buf: bytes) -> bytes:
        """LF framing, the usual case: only events holding an empty list are examined."""
        last = buf.rfind(b"\n\n")
        hold = last + 2 if last >= 0 else 0  # from here on: an event still arriving
        out: list[bytes] = []
        emit_from = 0
        i = buf.find(b"[]")
        while 0 <= i < hold:
            start = buf.rfind(b"\n\n", 0, i)
            start = 0 if start < 0 else start + 2
            end = buf.find(b"\n\n", i) + 2
            if is_usage_only_event(buf[start:end]):
                out.append(buf[emit_from:start])
                emit_from = end
            i = buf.find(b"[]", end)
        self._pending = buf[hold:]
        if not out:
            return buf[:hold]
        out.append(buf[emit_from:hold])
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        if not self._passthrough and is_usage_only_event(rest):
            return b""
        return rest
