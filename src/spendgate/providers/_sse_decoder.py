"""Bytes → Server-Sent Events, incrementally, per the WHATWG framing rules.

Handles pieces split anywhere (mid-line, mid-UTF-8, between ``\\r`` and ``\\n``),
CRLF/LF/CR line ends, comments and keep-alives. Data stays ``bytes`` so a broken
UTF-8 sequence only spoils the one event that holds it.

Linear and bounded whatever the upstream sends: a line still arriving is kept as a list
of pieces, and each new piece is searched for a line end once (never the pieces before
it), so a line with no end costs one scan of its bytes; a line, or an event, longer than
:data:`MAX_EVENT_BYTES` is dropped and counted in :attr:`SSEDecoder.skipped`.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_EVENT_BYTES = 8 << 20
"""Largest SSE line or event (its data lines together) kept for parsing: about a thousand
times the largest event any recording holds (a Responses ``response.completed`` event
repeats the whole answer). Past it the event is dropped, counted in ``skipped``; the
client still gets its bytes, only the meter's copy goes without it."""


class SSEEvent(NamedTuple):
    """One event (a tuple: built for every event of every stream, so it must be cheap)."""

    event: str
    data: bytes
    id: str = ""


class _Dropped(list[bytes]):
    """The data of an event being dropped: takes lines and keeps none. Being empty, it
    dispatches nothing at the blank line that ends the event, which resets as usual."""

    def append(self, line: bytes) -> None:
        pass


_SKIP = b"(the rest of an oversized line)"
"""``_parts[0]`` while an oversized line is being skipped: told apart by identity (a piece
is never this very object)."""


class SSEDecoder:
    __slots__ = (
        "_data", "_event", "_held", "_id", "_open", "_open_lines", "_open_size", "_parts",
        "skipped",
    )  # fmt: skip

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        """The line still arriving, in pieces; ``[_SKIP]`` while skipping an oversized one."""
        self._held = 0
        """Bytes in ``_parts``."""
        self._event = ""
        self._id = ""
        self._data: list[bytes] = []
        self._open: list[bytes] | None = None
        """The data of the event the last piece left open, sized up to ``_open_lines``
        lines and ``_open_size`` bytes: each line is counted once."""
        self._open_lines = self._open_size = 0
        self.skipped = 0
        """Lines or events dropped for being longer than :data:`MAX_EVENT_BYTES`."""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        parts = self._parts
        if parts:  # a line from an earlier piece is still arriving
            if b"\n" not in chunk and b"\r" not in chunk:
                self._hold(chunk)  # it goes on: hold the piece, scan nothing again
                return []
            # An oversized line that ends here leaves a comment line in its place.
            skipped = parts[0] is _SKIP
            buf = b":" + chunk[_line_end(chunk) :] if skipped else b"".join(parts) + chunk
            parts.clear()
            self._held = 0
        else:
            buf = chunk
        if b"\r" in buf:
            held = b""
            if buf.endswith(b"\r"):  # may be the first half of a CRLF
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            tail = lines.pop() + held
        else:
            lines = buf.split(b"\n")
            tail = lines.pop()
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:  # the two common lines are inlined: this is the hot path
            if line[:6] == b"data: ":
                data.append(line[6:])
            elif not line and data:  # a blank line dispatches the event
                value = data[0] if len(data) == 1 else b"\n".join(data)
                events.append(SSEEvent(self._event or "message", value, self._id))
                data = self._data = []
                self._event = ""
            else:
                self._line(line, events)
                data = self._data
        if data:  # an event goes on into the next piece: keep its size in bounds
            self._size_open(data)
        if tail:
            self._hold(tail)
        return events

    def _hold(self, piece: bytes) -> None:
        """Keep a piece of the line still arriving, or drop the line once it is too long
        (and the event it belongs to: its data would be incomplete)."""
        parts = self._parts
        if parts and parts[0] is _SKIP:
            return
        self._held += len(piece)
        if self._held <= MAX_EVENT_BYTES:
            parts.append(piece)
            return
        parts[:] = [_SKIP]
        self._held = 0
        self._drop_event()

    def _size_open(self, data: list[bytes]) -> None:
        """Size the open event's data, each line once however many pieces the event
        spans, and drop the event past :data:`MAX_EVENT_BYTES`."""
        if data is self._open:
            first, size = self._open_lines, self._open_size
        else:
            first = size = 0
        for i in range(first, len(data)):
            size += len(data[i])
        if size > MAX_EVENT_BYTES:
            self._drop_event()
            return
        self._open, self._open_lines, self._open_size = data, len(data), size

    def _drop_event(self) -> None:
        if not isinstance(self._data, _Dropped):
            self.skipped += 1
            self._data = _Dropped()
        self._open = None

    def close(self) -> list[SSEEvent]:
        """End of stream: a final event without its blank line is still delivered."""
        events: list[SSEEvent] = []
        parts = self._parts
        if parts and parts[0] is not _SKIP:
            self._line(b"".join(parts).rstrip(b"\r"), events)
        parts.clear()
        self._held = 0
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                data = b"\n".join(self._data)
                events.append(SSEEvent(self._event or "message", data, self._id))
            self._data = []
            self._event = ""
            return
        if line[0] == 0x3A:  # ':' comment / keep-alive
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")
        elif field == b"id":
            self._id = value.decode("utf-8", "replace")


def _line_end(chunk: bytes) -> int:
    """Index of the first line end (``\\r`` or ``\\n``) in ``chunk``, which has one."""
    lf, cr = chunk.find(b"\n"), chunk.find(b"\r")
    return lf if cr < 0 or 0 <= lf < cr else cr
