"""Bytes → Server-Sent Events, incrementally, per the WHATWG framing rules.

Handles pieces split anywhere (mid-line, mid-UTF-8, between ``\\r`` and ``\\n``),
CRLF/LF/CR line ends, comments and keep-alives. Data stays ``bytes`` so a broken
UTF-8 sequence only spoils the one event that holds it.
"""

from __future__ import annotations

from typing import NamedTuple


class SSEEvent(NamedTuple):
    """One event (a tuple: built for every event of every stream, so it must be cheap)."""

    event: str
    data: bytes
    id: str = ""


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._id = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            held = b""
            if buf.endswith(b"\r"):  # may be the first half of a CRLF
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            self._buf = lines.pop() + held
        else:
            lines = buf.split(b"\n")
            self._buf = lines.pop()
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
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: a final event without its blank line is still delivered."""
        events: list[SSEEvent] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), events)
            self._buf = b""
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
