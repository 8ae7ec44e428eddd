"""Pieces every adapter shares: safe JSON access, body framing, the parser skeleton.

Provider JSON is untrusted: a field may be missing, null, a string where a number
belongs, or the bytes may not be JSON at all. Everything here turns such input into
"not reported" (``None``) instead of an exception, so a parser can never break
forwarding (docs/reference.md §3).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Protocol

import orjson

from spendgate.providers._api import BaseParser, RequestInfo
from spendgate.providers._sse_decoder import MAX_EVENT_BYTES, SSEDecoder
from spendgate.usage import MAX_TOKENS, Extras, Note, Usage

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest JSON body or JSON-array element buffered for parsing; beyond it, no usage.
Room for the largest answer a provider sends whole (OpenAI embeddings for 2,048 inputs
of 3,072 dimensions in base64, the SDKs' default, are about 34 MB), while a broken or
hostile upstream cannot make one response hold more than this. An SSE event or an
NDJSON line is held to the smaller ``MAX_EVENT_BYTES`` (8 MiB)."""

DENSE_CHECK_BYTES = 1 << 20
"""Payloads larger than this are sized up before they are parsed (below it, the parsed
objects take at most about 32 MB, whatever the bytes)."""
MAX_PARSE_COST = 64 << 20
"""Estimated memory the objects parsed from one payload may take. Parsed JSON can take
thirty times its size (``[{},{},...]``: a dict per three bytes), so a dense payload of a
few megabytes would otherwise cost gigabytes; text and base64 take about their size."""
REREAD_BYTES = 1 << 16
"""Payloads orjson rejects up to this size are read again with Python's ``json`` (which
reads ``NaN``, ``Infinity`` and numbers beyond a double, as Python servers write them),
so that such a usage count is refused as out of range rather than losing its event."""

JSONObject = dict[str, Any]


# --- safe access -----------------------------------------------------------------


def as_int(value: Any) -> int | None:
    """A token count, or None when it is missing or not a non-negative integer.

    ``bool`` is rejected (it is an ``int`` subclass); integral floats are accepted
    because some OpenAI-compatible servers emit ``12.0``.
    """
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    return None


def as_dict(value: Any) -> JSONObject | None:
    return value if isinstance(value, dict) else None


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def str_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def nonempty_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def json_len(value: Any) -> int:
    """Length of a structured value (tool arguments) as the model wrote it, roughly."""
    if isinstance(value, str):
        return len(value)
    if value is None:
        return 0
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return 0


def ignore_note(text: str) -> None:
    """A :data:`~spendgate.usage.Note` that keeps nothing (for callers with no row)."""


INVALID = -1
"""What :func:`part` returns for a count that was reported but is not valid (and noted):
a sum that includes it is not reported either (:func:`total`)."""


def count(value: Any, field: str, note: Note) -> int | None:
    """A usage count as it enters spendgate: a non-negative integer up to ``MAX_TOKENS``
    (integral floats too: ``12.0``), else None: missing (absent or null), or not a count
    (negative, beyond the bound, a bool, a string, NaN, infinite, a fraction), which
    ``note`` is told, with the provider's field name."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value  # nearly every count: one type check and two comparisons
    if value is None:
        return None
    value = part(value, field, note)
    return None if value == INVALID else value


def part(value: Any, field: str, note: Note) -> int | None:
    """:func:`count` for a part of a sum: :data:`INVALID` for a value that is no count,
    so that :func:`total` can tell it from a part not reported."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if value is None:
        return None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)
    numeric = type(value) is int or (type(value) is float and not math.isnan(value))
    integral = numeric and (type(value) is int or value.is_integer() or math.isinf(value))
    problem = "out of range" if integral else "not an integer"
    note(f"usage {problem}: {field}={shown(value)}")
    return INVALID


def valid(value: int | None) -> int | None:
    """A :func:`part` as a field: :data:`INVALID` is not reported."""
    return None if value == INVALID else value


def total(*values: int | None) -> int | None:
    """Sum of the reported counts; None if none was reported, or if one was invalid (a
    sum missing a part would under-report: better an estimate, flagged)."""
    if INVALID in values:
        return None
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def shown(value: Any) -> str:
    """A short, printable rendering of an upstream's value for a note or a log line."""
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        bits = value.bit_length()
        return str(value) if bits <= 128 else f"an integer of {bits} bits"
    if type(value) is float:
        return repr(value).replace("e+", "e")
    if isinstance(value, str):
        head = json.dumps(value[:24])  # ASCII escapes: nothing unprintable gets through
        return head if len(value) <= 24 else head[:-1] + '..."'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_TIER = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_REPORTED_USD = Decimal(10_000)
"""The largest cost one response may report (``usage.cost``): more than any real
response costs; beyond it the figure is not taken (a unit slip or a hostile upstream)."""


def service_tier(value: Any, note: Note) -> str | None:
    """A reported service tier (``flex``, ``priority``, ``standard``...), lower case; a
    value that is no short name is not taken, and ``note`` is told."""
    if value is None:
        return None
    if type(value) is str:
        tier = value.lower()
        if _TIER.fullmatch(tier):
            return tier
    note(f"service tier not understood: {shown(value)}")
    return None


def reported_usd(value: Any, field: str, note: Note) -> Decimal | None:
    """A cost the provider reports: a finite number from 0 to ``MAX_REPORTED_USD``, read
    exactly (floats through their shortest form), else None and ``note`` is told."""
    if value is None:
        return None
    if (type(value) is int or type(value) is float) and math.isfinite(value):
        usd = Decimal(repr(value)) if type(value) is float else Decimal(value)
        if 0 <= usd <= MAX_REPORTED_USD:
            return usd
    note(f"reported cost not taken: {field}={shown(value)}")
    return None


def with_extras(usage: Usage | None, **found: Any) -> Usage | None:
    """``usage`` with the :class:`~spendgate.usage.Extras` fields found (those not None,
    0 or empty) set; ``usage`` itself when nothing was found."""
    changes = {k: v for k, v in found.items() if v}
    if usage is None or not changes:
        return usage
    return usage._replace(extras=(usage.extras or Extras())._replace(**changes))


def tool_calls(counts: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """The ``Extras.tool_calls`` form of per-tool counts (tools with no calls left out)."""
    return tuple(sorted((tool, n) for tool, n in counts.items() if n))


def reported(usage: Usage) -> Usage | None:
    """``usage`` if it reports anything, else None (an empty block is no report)."""
    if (
        usage.input_tokens is None
        and usage.output_tokens is None
        and usage.cached_input_tokens is None
        and usage.cache_write_tokens is None
        and usage.reasoning_tokens is None
    ):
        return None
    return usage


def loads_object(data: bytes) -> JSONObject | None:
    """Parse a JSON object; anything else (bad JSON, bad UTF-8, a list) gives None."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --- request bodies ----------------------------------------------------------------


def loads_lenient(data: bytes) -> JSONObject | None:
    """A request body as the most lenient common server reads it, for a body orjson
    rejects (call it only after :func:`loads_object` failed: it is the slow path).

    A body spendgate cannot read but the upstream can would go unbilled, so this reads
    what servers built on Python's ``json`` (FastAPI, most OpenAI-compatible servers)
    or Go's ``encoding/json`` (Ollama, many gateways) accept and orjson does not:

    - a UTF-8 byte order mark, and UTF-16 or UTF-32 (``json.loads`` on bytes detects
      the encoding as Python servers do);
    - lone surrogates, escaped (``"\\ud800"``) or as raw bytes;
    - invalid UTF-8, replaced by U+FFFD (as Go does);
    - ``NaN``, ``Infinity`` and ``-Infinity``: Python's ``json`` accepts them, so a
      FastAPI server does. Reading such a body can only make a reservation match it; a
      server that rejects it bills nothing. (They are never a valid token count.)

    Still rejected, as servers reject them: comments, trailing commas, single quotes,
    anything but an object at the top. Nesting too deep for the stdlib parser, or an
    integer of more than 4,300 digits, gives None too.
    """
    try:
        try:
            value = json.loads(data)
        except UnicodeDecodeError:
            value = json.loads(data.decode("utf-8-sig", "replace"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_object(body: bytes) -> JSONObject | None:
    """A request body's JSON object: orjson first (the hot path pays nothing more),
    :func:`loads_lenient` only for a body orjson rejects."""
    obj = loads_object(body)
    return obj if obj is not None else loads_lenient(body)


def unread_request(
    operation: str, body: bytes, model: str | None = None, stream: bool = False
) -> RequestInfo:
    """The :class:`RequestInfo` of a body not even :func:`loads_lenient` reads: what the
    path says, the body's size as its prompt, and ``unread`` so that its reservation is
    the worst case."""
    return RequestInfo(
        operation=operation,
        model=model,
        stream=stream,
        input_chars=len(body),
        body=body,
        unread=True,
    )


# Subtrees that hold binary payloads (base64 images, audio, signatures): counting them
# as prompt text would inflate estimates and reservations by orders of magnitude.
_BINARY_KEYS = frozenset(
    {
        "data",
        "image_url",
        "file_data",
        "images",
        "b64_json",
        "signature",
        "thoughtSignature",
        "thought_signature",
        "encrypted_content",
        "input_audio",
    }
)


def text_chars(obj: JSONObject, keys: Iterable[str]) -> int:
    """Characters of every string under ``obj[key]`` for ``key`` in ``keys``.

    A rough prompt size for estimates; dict keys and binary payloads are not counted.
    Iterative, so deeply nested input cannot hit the recursion limit.
    """
    total = 0
    stack: list[Any] = [v for k in keys if (v := obj.get(k)) is not None]
    while stack:  # exact type checks: the values come from orjson
        value = stack.pop()
        kind = type(value)
        if kind is str:
            total += len(value)
        elif kind is dict:
            for k, v in value.items():
                if type(v) is str:
                    if k not in _BINARY_KEYS:
                        total += len(v)
                elif v is not None and k not in _BINARY_KEYS:
                    stack.append(v)
        elif kind is list:
            stack.extend(value)
    return total


MAX_OUTPUT_TOKENS = 10_000_000
"""Cap on an output bound read from a request: about ten times the largest output any
model in the bundled price table offers (1,048,576 tokens). It keeps an absurd
``max_tokens`` (``1e300``, a 40-digit integer) a bound that still prices to a sane
Decimal, while staying large enough that such a request is refused by a budget rather
than reserved as cheap."""

MAX_CHOICES = 128
"""Cap on the completions one request may ask for (OpenAI's own limit on ``n``)."""


def largest_int(
    obj: JSONObject | None, keys: tuple[str, ...], cap: int = MAX_OUTPUT_TOKENS
) -> int | None:
    """The largest valid integer (:func:`as_int`) among ``keys``, at most ``cap``; None
    when none holds one.

    For the spellings of one limit (``max_tokens``, ``max_completion_tokens``, ...): a
    server may honour any of them, so a worst case takes the largest, never the first.
    ``keys`` is a tuple, not ``*keys``: this runs per request, and packing arguments
    costs a third of it.
    """
    if obj is None:
        return None
    best: int | None = None
    for key in keys:
        raw = obj.get(key)
        if raw is None:
            continue
        value = as_int(raw)
        if value is not None and (best is None or value > best):
            best = value
    return best if best is None or best <= cap else cap


def choice_count(obj: JSONObject | None, keys: tuple[str, ...]) -> int:
    """Completions asked for: the largest valid count among ``keys``, at most
    :data:`MAX_CHOICES`; 1 when none is valid (absent, zero, negative, not an integer)."""
    return largest_int(obj, keys, MAX_CHOICES) or 1


# --- framing: response bytes -> JSON payloads -------------------------------------


class Framer(Protocol):
    """Cuts a byte stream into complete JSON payloads (one per event, line or element)."""

    def feed(self, data: bytes) -> list[bytes]: ...

    def close(self) -> list[bytes]: ...

    def problem(self) -> str | None:
        """Why part of the body was not handed on (too long), for the row's note."""


def _mib(n: int) -> str:
    return f"{n >> 20} MiB"


class SSEFramer:
    """The ``data`` of each Server-Sent Event (the event name is repeated in the JSON)."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = SSEDecoder()

    def feed(self, data: bytes) -> list[bytes]:
        return [event.data for event in self._decoder.feed(data)]

    def close(self) -> list[bytes]:
        return [event.data for event in self._decoder.close()]

    def problem(self) -> str | None:
        n = self._decoder.skipped
        if not n:
            return None
        return (
            f"oversized SSE events skipped: {n} over {_mib(MAX_EVENT_BYTES)}, usage may be missing"
        )


class LineFramer:
    """Newline-delimited JSON (Ollama). Partial lines are kept as parts, not re-joined; a
    line longer than ``MAX_EVENT_BYTES`` is dropped (``_size`` -1 while skipping it)."""

    __slots__ = ("_parts", "_size", "skipped")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.skipped = 0

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._hold(data)
            return []
        lines = data.split(b"\n")
        if self._size < 0:
            lines[0] = b""  # the end of the oversized line
        elif self._parts:
            lines[0] = b"".join(self._parts) + lines[0]
        self._parts, self._size = [], 0
        self._hold(lines.pop())
        return [line for line in lines if line.strip()]

    def _hold(self, piece: bytes) -> None:
        if self._size < 0 or not piece:
            return
        self._size += len(piece)
        if self._size <= MAX_EVENT_BYTES:
            self._parts.append(piece)
        else:
            self._parts, self._size = [], -1
            self.skipped += 1

    def close(self) -> list[bytes]:
        rest = b"".join(self._parts)
        self._parts, self._size = [], 0
        return [rest] if rest.strip() else []

    def problem(self) -> str | None:
        n = self.skipped
        if not n:
            return None
        return (
            f"oversized NDJSON lines skipped: {n} over {_mib(MAX_EVENT_BYTES)}, "
            "usage may be missing"
        )


class BodyFramer:
    """One JSON document: buffered as parts and parsed once, at the end."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._size += len(data)
        if self._size <= MAX_BODY_BYTES:
            self._parts.append(data)
        else:
            self._parts = []
        return []

    def close(self) -> list[bytes]:
        body = b"".join(self._parts)
        self._parts = []
        return [body] if body else []

    def problem(self) -> str | None:
        if self._size <= MAX_BODY_BYTES:
            return None
        return f"JSON body over {_mib(MAX_BODY_BYTES)}: not parsed"


JSON_STRUCTURAL = re.compile(rb'["{}\[\]]')
JSON_IN_STRING = re.compile(rb'["\\]')
JSON_WHITESPACE = b" \t\r\n"


class JSONElementFramer:
    """Each top-level element of a streamed JSON array, as soon as it is complete.

    Gemini's ``streamGenerateContent`` without ``alt=sse`` sends ``[{...}\\r\\n,{...}]``
    over time. A single top-level object (``generateContent``) or concatenated objects
    are yielded the same way. The scanner jumps between structural bytes with a regex
    and keeps its state (depth, inside-string, pending escape) across pieces, so each
    byte is scanned once; consumed bytes are dropped from the buffer.
    """

    __slots__ = ("_base", "_buf", "_depth", "_done", "_in_str", "_oversized", "_pos", "_start")

    def __init__(self) -> None:
        self._oversized = False
        self._buf = bytearray()
        self._pos = 0
        self._depth = 0
        self._base = -1  # depth at which elements start: 1 inside an array, 0 for objects
        self._in_str = False
        self._start = -1
        self._done = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._done:
            return []
        buf = self._buf
        buf.extend(data)
        if self._base < 0 and not self._open(buf):
            return []
        out: list[bytes] = []
        if not self._scan(buf, out):
            return out + self._stop()  # the outer array closed, or a stray bracket
        # Drop the scanned bytes no element still needs: all of them between elements,
        # those before the open element's start inside one.
        start = self._start
        cut = start if start >= 0 else min(self._pos, len(buf))
        if cut:
            del buf[:cut]
            self._pos -= cut
            if start >= 0:
                self._start = 0
        if len(buf) > MAX_BODY_BYTES:
            self._oversized = True
            return out + self._stop()
        return out

    def problem(self) -> str | None:
        if not self._oversized:
            return None
        return f"JSON element over {_mib(MAX_BODY_BYTES)}: parsing stopped"

    def _open(self, buf: bytearray) -> bool:
        """Reads the body's first byte, past whitespace: ``[`` (elements start inside it)
        or ``{``; False while there is only whitespace, or for anything else (then the
        framer stops)."""
        i, n = self._pos, len(buf)
        while i < n and buf[i] in JSON_WHITESPACE:
            i += 1
        if i == n:
            buf.clear()
            self._pos = 0
            return False
        if buf[i] == 0x5B:  # '['
            self._base, self._depth, self._pos = 1, 1, i + 1
        elif buf[i] == 0x7B:  # '{'
            self._base, self._pos = 0, i
        else:
            self._stop()
            return False
        return True

    def _scan(self, buf: bytearray, out: list[bytes]) -> bool:
        """Scans ``buf`` from where the last piece left off, appending each element that
        completes to ``out``; False at a bracket that closes below the elements' depth.

        One loop, locals only: it runs for every structural byte of the body. An element
        is returned when the bracket that opened it (at depth ``base``) is closed.
        """
        i, depth, start, in_str = self._pos, self._depth, self._start, self._in_str
        base, n = self._base, len(buf)
        structural, in_string = JSON_STRUCTURAL.search, JSON_IN_STRING.search
        search = (structural, in_string)[in_str]  # the next byte that matters in this state
        while True:
            m = search(buf, i)
            if m is None:
                break
            c, i = buf[m.start()], m.end()
            if in_str:
                if c == 0x5C:  # backslash: skip the escaped byte
                    i += 1
                else:
                    in_str, search = False, structural
            elif c == 0x22:  # '"'
                in_str, search = True, in_string
            elif c in (0x7B, 0x5B):  # '{' '['
                if depth == base:
                    start = m.start()
                depth += 1
            else:
                depth -= 1
                if depth < base:
                    return False
                if depth == base:  # start is set: the bracket that opened it was at base
                    out.append(bytes(buf[start:i]))
                    start = -1
        i = max(i, n)  # n + 1 after a final backslash in a string: skip the next byte
        self._pos, self._depth, self._start, self._in_str = i, depth, start, in_str
        return True

    def close(self) -> list[bytes]:
        """A truncated element is dropped: it cannot be parsed."""
        return self._stop()

    def _stop(self) -> list[bytes]:
        self._done = True
        self._buf = bytearray()
        return []


# --- the parser skeleton -------------------------------------------------------------


class FramedParser(BaseParser):
    """Sniffs the body's framing from its first byte, then hands each JSON object on.

    Content types lie (or are missing), so the body decides: ``{`` or ``[`` is JSON,
    anything else is SSE. Subclasses pick the framer for each case, may skip payloads
    by a cheap byte check (``_wanted``) and interpret objects (``_handle``). Every
    failure is contained: a bad payload is skipped, a broken framer stops parsing.
    """

    ONE_JSON_DOCUMENT = True
    """A JSON body is one document (``BodyFramer``), so a whole one can skip framing."""

    def __init__(self) -> None:
        super().__init__()
        self._framer: Framer | None = None
        self._unreadable = 0
        """Payloads neither orjson nor Python's ``json`` could read."""

    def _json_framer(self) -> Framer:
        return BodyFramer()

    def _text_framer(self) -> Framer:
        return SSEFramer()

    def _wanted(self, payload: bytes) -> bool:
        return True

    def _handle(self, obj: JSONObject) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        try:
            if self._framer is None:
                data = data.lstrip().removeprefix(b"\xef\xbb\xbf")
                if not data:
                    return
                json_like = data[0] in (0x7B, 0x5B)
                self._framer = self._json_framer() if json_like else self._text_framer()
            payloads = self._framer.feed(data)
        except Exception:
            self._stop_framing("framing failed: parsing stopped")
            return
        self._payloads(payloads)

    def feed_whole(self, body: bytes) -> None:
        # A non-streamed answer is nearly always one JSON object: parse it directly.
        if (
            self.ONE_JSON_DOCUMENT
            and self._framer is None
            and body[:1] == b"{"
            and len(body) <= MAX_BODY_BYTES
        ):
            self._framer = _DEAD
            self._payloads([body])
            return
        self.feed(body)
        self.close()

    def close(self) -> None:
        if self._framer is None:
            return
        try:
            payloads = self._framer.close()
        except Exception:
            payloads = []
        self._stop_framing()
        self._payloads(payloads)

    def _stop_framing(self, why: str | None = None) -> None:
        """No more framing: keep what the framer has to say, then let it go."""
        framer = self._framer
        problem = framer.problem() if framer is not None else None
        for text in (problem, why):
            if text:
                self._note(text)
        self._framer = _DEAD

    @property
    def notes(self) -> list[str]:
        framer = self._framer
        if framer is _DEAD and self._notes is None and not self._unreadable:
            return []  # nearly every response, once closed
        notes = super().notes
        problem = framer.problem() if framer is not None else None
        if problem and problem not in notes:
            notes.append(problem)  # mid-stream: the framer still holds it
        if self._unreadable:
            notes.append(f"not valid JSON: {self._unreadable} payload(s) skipped")
        return notes

    def _payloads(self, payloads: list[bytes]) -> None:
        wanted, handle = self._wanted, self._handle
        for payload in payloads:
            try:
                if not wanted(payload):
                    continue
                if len(payload) > DENSE_CHECK_BYTES and self._too_dense(payload):
                    continue
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    obj = self._reread(payload)
                if type(obj) is dict:
                    handle(obj)
            except Exception:  # a surprise shape: skip this payload
                continue

    def _too_dense(self, payload: bytes) -> bool:
        cost = parse_cost(payload, MAX_PARSE_COST)
        if cost <= MAX_PARSE_COST:
            return False
        self._note(
            f"JSON too dense to parse: a payload of {len(payload):,} bytes would take over "
            f"{_mib(MAX_PARSE_COST)} parsed, usage may be missing"
        )
        return True

    def _reread(self, payload: bytes) -> Any:
        """A payload orjson rejects, read as Python's ``json`` reads it (small ones only:
        this is the slow path); None, counted, if that fails too."""
        if len(payload) <= REREAD_BYTES:
            try:
                return json.loads(payload)  # invalid UTF-8 stays an error
            except (ValueError, RecursionError):
                pass
        self._unreadable += 1
        return None


_STRUCTURE = bytes(range(256)).translate(None, b"{[,:")
"""Every byte but the four that start a parsed object (``bytes.translate`` deletes these)."""
_COST_WINDOW = 1 << 20


def parse_cost(payload: bytes, limit: int) -> int:
    """About how much memory parsing ``payload`` takes, in bytes (measured with orjson on
    CPython 3.11: a dict about 200 bytes, any other value 64 or less, text one byte per
    byte). Read in windows of 1 MiB, stopping as soon as it passes ``limit``: a dense
    payload is refused after a few windows, and no window is copied more than once."""
    cost = 0
    for start in range(0, len(payload), _COST_WINDOW):
        window = payload[start : start + _COST_WINDOW]
        marks = window.translate(None, _STRUCTURE)
        cost += len(window) + 64 * len(marks) + 136 * marks.count(b"{")
        if cost > limit:
            break
    return cost


class _DeadFramer:
    def feed(self, data: bytes) -> list[bytes]:
        return []

    def close(self) -> list[bytes]:
        return []

    def problem(self) -> str | None:
        return None


_DEAD = _DeadFramer()
