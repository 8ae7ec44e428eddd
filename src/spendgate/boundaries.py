"""Where a stream cut for budget may end, per wire format, and the bytes that end it
(docs/reference.md §6 "Mid-stream: `finish` or `cut`").

A client parses a stream in units: SSE events, NDJSON lines, the elements of a JSON
array (Gemini's ``streamGenerateContent`` without ``alt=sse``). The budget cut must stop
between two units and then end the stream the way that format ends, else the client
sees a broken stream instead of the provider-shaped error. A :class:`Boundaries` is
given every piece the client gets from the moment the cut is possible (it keeps what
state the format needs across pieces: a JSON array's depth, a string still open, an
escape split between pieces; a few integers, never the bytes), and says where in the
latest piece the last unit ended.

The upstream is hostile: a unit may never end (an element of gigabytes, a body that is
no array at all). A cut waits at most :data:`MAX_CUT_WAIT_BYTES` past the point it was
due for a boundary; then the connection is closed without one, and that is logged.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from spendgate.errors import error_payload, stream_error_bytes
from spendgate.forwarding import event_end
from spendgate.providers._common import JSON_IN_STRING, JSON_STRUCTURAL, JSON_WHITESPACE

MAX_CUT_WAIT_BYTES = 1 << 20
"""Bytes a due cut lets through while waiting for a unit to end (1 MiB: a Gemini element
or an SSE event is a few KiB; a final Responses event with a long answer can be more)."""


class Boundaries(Protocol):
    """One stream's cut points, fed the client's bytes in order."""

    opaque: bool
    """No boundary can ever be found (a compressed body): a due cut closes at once."""

    def scan(self, data: bytes) -> int:
        """The next piece the client gets: the index in it just past the last unit that
        ends in it, or -1."""

    @property
    def clean(self) -> bool:
        """Everything scanned so far ends where the stream may end (between units)."""

    def ending(self, style: str, message: str, kind: str, code: str, truncated: bool) -> bytes:
        """The bytes that end the stream with a 402 error after the cut point:
        ``truncated`` when the last piece was cut at :meth:`scan`'s index, else after
        everything scanned (:attr:`clean` held)."""


def boundaries_for(content_type: str, encoding: str) -> Boundaries:
    """The cut points of a response with this (lower-cased) content type and encoding."""
    if encoding and encoding != "identity":
        return Opaque()
    if "ndjson" in content_type:
        return LineBoundaries()
    if content_type.startswith("text/event-stream"):
        return EventBoundaries()
    return ArrayBoundaries()


class Opaque:
    """Compressed bytes: a boundary in them is no boundary the client's decoder sees."""

    __slots__ = ()
    opaque = True
    clean = False

    def scan(self, data: bytes) -> int:
        return -1

    def ending(self, style: str, message: str, kind: str, code: str, truncated: bool) -> bytes:
        return b""


class LineBoundaries:
    """NDJSON (Ollama): a unit ends at each newline."""

    __slots__ = ("clean",)
    opaque = False

    def __init__(self) -> None:
        self.clean = True

    def scan(self, data: bytes) -> int:
        if data:
            self.clean = data.endswith(b"\n")
        return event_end(data, True)

    def ending(self, style: str, message: str, kind: str, code: str, truncated: bool) -> bytes:
        return stream_error_bytes(style, 402, message, kind, code)


class EventBoundaries:
    """SSE: an event ends at a blank line (``\\n\\n`` or ``\\r\\n\\r\\n``), which may be
    split between pieces: the last three bytes of the previous piece are searched too."""

    __slots__ = ("_tail",)
    opaque = False

    def __init__(self) -> None:
        self._tail = b""
        """The last four bytes the client got."""

    def scan(self, data: bytes) -> int:
        prev = self._tail[-3:]
        end = event_end(data, False)
        if end < 0:  # a blank line split between pieces ends in the first bytes of this one
            split = event_end(prev + data[:3], False)
            if split > len(prev):
                end = split - len(prev)
        self._tail = data[-4:] if len(data) >= 4 else (self._tail + data)[-4:]
        return end

    @property
    def clean(self) -> bool:
        """Nothing sent yet (the start of a stream is a boundary), or a blank line last."""
        return not self._tail or self._tail.endswith((b"\n\n", b"\r\n\r\n"))

    def ending(self, style: str, message: str, kind: str, code: str, truncated: bool) -> bytes:
        return stream_error_bytes(style, 402, message, kind, code)


_BEFORE, _INSIDE, _AFTER = 0, 1, 2
_SEPARATORS = JSON_WHITESPACE + b","


class ArrayBoundaries:
    """A JSON array streamed element by element: a unit ends where an element at the top
    level ends (an object, array or string; Gemini sends objects). The cut closes the
    array after it with the error object as its last element, so a client that parses
    the array gets every whole element and then the error.

    The structural bytes are found with a regex (each byte scanned once); the state is
    the depth, whether a string is open, and an escape split off at a piece's end.
    Anything other than an array (a single object, garbage) has no boundary.
    """

    __slots__ = ("_comma", "_depth", "_element", "_in_str", "_skip", "_state", "clean")
    opaque = False

    def __init__(self) -> None:
        self._state = _BEFORE
        self._depth = 0
        self._in_str = self._skip = self._comma = self._element = False
        self.clean = False
        """Only whitespace and commas since the array opened or its last element."""

    def scan(self, data: bytes) -> int:
        state, n = self._state, len(data)
        if state == _AFTER:
            self.clean = False
            return -1
        i = 0
        if state == _BEFORE:
            while i < n and data[i] in JSON_WHITESPACE:
                i += 1
            if i == n:
                return -1
            if data[i] != 0x5B:  # '[': not an array, so no element is a unit
                self._state, self.clean = _AFTER, False
                return -1
            self._state, self._depth, self.clean = _INSIDE, 1, True
            i += 1
        start = i
        if self._skip:  # the byte after a backslash that ended the last piece
            i, self._skip = i + 1, False
        depth, in_str, end = self._depth, self._in_str, -1
        structural, in_string = JSON_STRUCTURAL.search, JSON_IN_STRING.search
        search = in_string if in_str else structural
        while (m := search(data, i)) is not None:
            c, i = data[m.start()], m.end()
            if in_str:
                if c == 0x5C:  # backslash: skip the escaped byte
                    i += 1
                    continue
                in_str, search = False, structural
                if depth == 1:
                    end = i
            elif c == 0x22:  # '"'
                in_str, search = True, in_string
            elif c in (0x7B, 0x5B):  # '{' '['
                depth += 1
            else:
                depth -= 1
                if depth == 1:
                    end = i
                elif depth < 1:  # the array closed: nothing after it is a unit
                    self._state, self.clean = _AFTER, False
                    self._element = self._element or end >= 0
                    return end
        self._skip, self._depth, self._in_str = i > n, depth, in_str
        if end >= 0:
            self._element = True
            rest = data[end:]
        else:
            rest = data[start:] if start else data
        between = depth == 1 and not in_str and not rest.strip(_SEPARATORS)
        if end >= 0:
            self._comma = b"," in rest
            self.clean = between
        else:
            self._comma = self._comma or b"," in rest
            self.clean = self.clean and between
        return end

    def ending(self, style: str, message: str, kind: str, code: str, truncated: bool) -> bytes:
        if self._state == _BEFORE:
            return b""  # nothing of the array went out: closing the connection says enough
        error = orjson.dumps(error_payload(style, 402, message, kind, code))
        comma = self._element and (truncated or not self._comma)
        return (b"," if comma else b"") + error + b"]"
