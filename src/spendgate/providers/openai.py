"""OpenAI wire format: chat completions, Responses, completions, embeddings.

Also serves Azure OpenAI (``/openai/deployments/{name}/...``) and every
OpenAI-compatible server (OpenRouter, Groq, DeepSeek, vLLM, Ollama's ``/v1``).
The parser recognises payloads by shape, not by endpoint, so one class reads chat
chunks, Responses events and plain JSON bodies alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from spendgate.providers._api import NullParser, RequestInfo, ResponseParser
from spendgate.providers._common import (
    FramedParser,
    JSONObject,
    SSEFramer,
    as_dict,
    as_int,
    as_list,
    first_int,
    loads_object,
    nonempty_str,
    str_len,
    text_chars,
)
from spendgate.usage import Usage

_AZURE = re.compile(r"/openai/deployments/([^/]+)/")
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/responses", "responses"),
    ("/completions", "completions"),
    ("/embeddings", "embeddings"),
)
OPERATIONS = frozenset(op for _, op in _OPERATIONS)
_PROMPT_KEYS = ("messages", "input", "prompt", "instructions", "tools")
_MAX_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def classify(method: str, path: str) -> str:
    """The operation for a path; reads of stored objects (GET) are not generations."""
    if method.upper() != "POST":
        return "other"
    path = path.rstrip("/")
    for suffix, op in _OPERATIONS:
        if path.endswith(suffix):
            return op
    return "other"


def map_usage(block: JSONObject, *, embeddings: bool = False) -> Usage | None:
    """OpenAI usage → spendgate usage; accepts both the chat and the Responses spelling.

    ``prompt_tokens``/``input_tokens`` already include cached tokens and
    ``completion_tokens``/``output_tokens`` already include reasoning (SPEC 2).
    """
    get = block.get
    inp = as_int(get("prompt_tokens"))
    if inp is None:
        inp = as_int(get("input_tokens"))
    out = as_int(get("completion_tokens"))
    if out is None:
        out = as_int(get("output_tokens"))
    if out is None and embeddings and inp is not None:
        out = 0
    details = get("prompt_tokens_details")
    if type(details) is not dict:
        details = get("input_tokens_details")
    cached = as_int(details.get("cached_tokens")) if type(details) is dict else None
    if cached is None and "prompt_cache_hit_tokens" in block:
        cached = as_int(get("prompt_cache_hit_tokens"))  # DeepSeek
    details = get("completion_tokens_details")
    if type(details) is not dict:
        details = get("output_tokens_details")
    reasoning = as_int(details.get("reasoning_tokens")) if type(details) is dict else None
    if inp is None and out is None and cached is None and reasoning is None:
        return None  # an empty block is no report
    return Usage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, reasoning_tokens=reasoning
    )


_TEXT_KEYS = frozenset({"content", "reasoning_content", "reasoning", "refusal"})


def message_chars(msg: JSONObject) -> int:
    """Generated characters in a chat ``delta`` or ``message`` (text, reasoning, tool args).

    Walks the (small) dict once instead of probing every possible key: this runs for
    every chunk of every stream.
    """
    n = 0
    for key, value in msg.items():
        if key in _TEXT_KEYS:
            n += str_len(value)
        elif key == "tool_calls":
            for call in as_list(value):
                fn = as_dict(call.get("function")) if isinstance(call, dict) else None
                if fn:
                    n += str_len(fn.get("arguments"))
        elif key == "function_call" and isinstance(value, dict):  # legacy functions API
            n += str_len(value.get("arguments"))
    return n


def _output_item_chars(item: Any) -> int:
    """Generated characters in one Responses ``output`` item of a JSON body."""
    if not isinstance(item, dict):
        return 0
    n = str_len(item.get("arguments"))
    for part in as_list(item.get("content")) + as_list(item.get("summary")):
        if isinstance(part, dict):
            n += str_len(part.get("text")) + str_len(part.get("refusal"))
    return n


MAX_LAZY_BYTES = 1 << 20
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
MAX_TAIL = 1 << 16
MAX_HELD = 1 << 16
MAX_PROBES = 4
MAX_LAZY_PAYLOADS = 4096


def _usage_object_at(buf: bytes) -> int:
    """Where a ``"usage": {`` starts in ``buf`` (-1 if none): everything before its event
    can be set aside unparsed. The usage chunk is normally the last event, so one look
    from the end finds it; a regex scan runs only when the last ``"usage"`` holds no
    object (``null`` on every chunk of a stream still running)."""
    at = buf.rfind(b'"usage"')
    if at < 0 or _OBJECT_VALUE.match(buf, at + 7):
        return at
    found = _USAGE_OBJECT.search(buf, 0, at)
    return -1 if found is None else found.start()


class OpenAIParser(FramedParser):
    """Chat chunks, Responses events, or one JSON body of any of the four endpoints."""

    def __init__(self, operation: str) -> None:
        super().__init__()
        self._embeddings = operation == "embeddings"
        self._lazy: list[bytes] = []
        """Complete SSE events that cannot hold usage, framed only if the estimate is read."""
        self._lazy_size = 0
        self._lazy_payloads: list[bytes] = []
        """JSON payloads of such events, when they arrived framed in a larger piece."""
        self._counting = False
        self._at_boundary = False
        """The framer holds no partial event (so bytes may bypass it)."""
        self._held: list[bytes] = []
        """Bytes not yet examined, from an event boundary on (see ``feed``)."""
        self._held_size = 0
        self._probes = 0

    def _wanted(self, payload: bytes) -> bool:
        # Cheap byte checks before orjson: ``[DONE]`` and non-JSON lines are skipped,
        # and the large Responses events that repeat finished text (``*.done``,
        # ``output_item.added``) carry neither usage nor a delta.
        if payload[:1] != b"{":
            return payload.lstrip()[:1] == b"{"
        if b'"type":"response.' in payload[:40]:
            return b'"usage"' in payload or b'.delta"' in payload or self._model is None
        if self._model is not None and not self._counting and _USAGE_OBJECT.search(payload) is None:
            self._lazy_payloads.append(payload)  # a delta: parsed only if the estimate is read
            if len(self._lazy_payloads) >= MAX_LAZY_PAYLOADS:
                self._count_lazy()
            return False
        return True

    def feed(self, data: bytes) -> None:
        # Once the model is known and the framer sits between events, pieces are only
        # held: each is one list append. They are examined together when the numbers are
        # read (usage, the estimate, close) or past MAX_HELD bytes, which turns a
        # stream's per-chunk cost into one scan of its bytes. A piece holding many
        # events (a whole short stream often arrives as one) has its first events
        # framed one at a time until one names the model, and the rest held.
        while self._model is None and self._probes < MAX_PROBES and b"\r" not in data:
            end = data.find(b"\n\n") + 2
            if end < 2 or end >= len(data):
                break
            self._probes += 1
            self._frame(data[:end])
            data = data[end:]
        if self._at_boundary and self._model is not None:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > MAX_HELD:
                self._release()
            return
        self._frame(data)

    def _frame(self, data: bytes) -> None:
        super().feed(data)
        self._at_boundary = isinstance(self._framer, SSEFramer) and data.endswith(b"\n\n")

    def _release(self) -> None:
        """Held pieces: whole events before the usage object are set aside
        unparsed (they matter only for the estimate); from that event on, parse. The
        start of an event still arriving stays held."""
        if not self._held:
            return
        buf = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held, self._held_size = [], 0
        if b"\r" in buf:  # CR line ends: only the framer reads those right
            self._frame(buf)
            return
        usage = _usage_object_at(buf)
        cut = buf.rfind(b"\n\n", 0, len(buf) if usage < 0 else usage) + 2
        if cut > 1:
            self._lazy.append(buf[:cut])
            self._lazy_size += cut
            buf = buf[cut:]
        if usage < 0 and len(buf) <= MAX_TAIL:
            if buf:
                self._held, self._held_size = [buf], len(buf)
        elif buf:
            self._frame(buf)
        if self._lazy_size > MAX_LAZY_BYTES:
            self._count_lazy()

    def close(self) -> None:
        self._release()
        if self._held:  # an event that never got its blank line
            (tail,), self._held, self._held_size = self._held, [], 0
            super().feed(tail)
        super().close()

    def settle(self) -> None:
        self._release()
        if self._lazy or self._lazy_payloads:
            self._count_lazy()

    @property
    def usage(self) -> Usage | None:
        self._release()
        return self._usage

    def _count_lazy(self) -> None:
        lazy, self._lazy, self._lazy_size = self._lazy, [], 0
        payloads, self._lazy_payloads = self._lazy_payloads, []
        self._counting = True
        try:
            framer = SSEFramer()  # the blocks are whole events: a fresh framer reads them
            for block in lazy:
                payloads.extend(framer.feed(block))
            self._payloads(payloads)
        finally:
            self._counting = False

    @property
    def output_chars(self) -> int:
        self._release()
        if self._lazy or self._lazy_payloads:
            self._count_lazy()
        return self._output_chars

    def _handle(self, obj: JSONObject) -> None:
        kind = obj.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            self._response_event(kind, obj)
            return
        if obj.get("object") == "response":  # a non-streamed Responses body
            self._response(obj, body=True)
            return
        if self._model is None:
            self._model = nonempty_str(obj.get("model"))  # Azure's first chunk has ""
        choices = obj.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict:
                    delta = choice.get("delta")
                    if type(delta) is not dict or not delta:
                        delta = choice.get("message")
                    if type(delta) is dict and delta:
                        self._output_chars += message_chars(delta)
                    text = choice.get("text")  # completions
                    if type(text) is str:
                        self._output_chars += len(text)
        block = obj.get("usage")  # may ride on a chunk with choices (OpenRouter)
        if type(block) is dict and not self._counting:  # set-aside events are older
            self._usage = map_usage(block, embeddings=self._embeddings) or self._usage

    def _response_event(self, kind: str, obj: JSONObject) -> None:
        if kind.endswith(".delta"):
            if not kind.endswith("audio.delta"):  # base64 audio is not text
                self._output_chars += str_len(obj.get("delta"))
            return
        response = as_dict(obj.get("response"))
        if response is not None:  # created/in_progress/completed/incomplete/failed
            self._response(response, body=False)

    def _response(self, response: JSONObject, *, body: bool) -> None:
        if self._model is None:
            self._model = nonempty_str(response.get("model"))
        block = as_dict(response.get("usage"))
        if block is not None and not self._counting:  # set-aside events are older
            self._usage = map_usage(block) or self._usage
        if body:
            self._output_chars += sum(
                _output_item_chars(i) for i in as_list(response.get("output"))
            )


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def _inject_include_usage(body: bytes, obj: JSONObject) -> bytes | None:
    """The body with ``stream_options.include_usage`` set, or None if it cannot be set.

    When the client sent no ``stream_options`` the key is spliced in after the opening
    brace so every other byte goes upstream untouched; otherwise the object is merged
    and re-serialized.
    """
    options = obj.get("stream_options")
    if options is None and "stream_options" not in obj:
        at = body.find(b"{")
        return body[: at + 1] + _INCLUDE_USAGE + body[at + 1 :]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return None
    try:
        return orjson.dumps({**obj, "stream_options": {**options, "include_usage": True}})
    except TypeError:
        return None


class OpenAIAdapter:
    """OpenAI and every server that speaks its wire format."""

    name = "openai"
    error_style = "openai"

    def inspect(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        *,
        inject_stream_usage: bool,
    ) -> RequestInfo:
        op = classify(method, path)
        if op == "other":
            return RequestInfo(operation="other", body=body)
        azure = _AZURE.search(path) if "/deployments/" in path else None
        deployment = azure.group(1) if azure else None
        obj = loads_object(body)
        if obj is None:
            return RequestInfo(operation=op, model=deployment, body=body)
        stream = obj.get("stream") is True
        info = RequestInfo(
            operation=op,
            model=nonempty_str(obj.get("model")) or deployment,
            stream=stream,
            max_output_tokens=first_int(obj, *_MAX_KEYS),
            input_chars=text_chars(obj, _PROMPT_KEYS),
            body=body,
        )
        if op != "chat" or not stream or not inject_stream_usage:
            return info
        options = as_dict(obj.get("stream_options"))
        if options is not None and options.get("include_usage") is True:
            return info  # the client asked for the usage chunk itself: leave it alone
        # Absent or false: either way the client expects no usage chunk, so add and hide it.
        rewritten = _inject_include_usage(body, obj)
        if rewritten is None:
            return info
        return info._replace(body=rewritten, strip_usage_chunk=True)

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser:
        if info.operation not in OPERATIONS:
            return NullParser()
        return OpenAIParser(info.operation)

    def output_filter(self, info: RequestInfo) -> UsageChunkFilter | None:
        return UsageChunkFilter() if info.strip_usage_chunk else None


# --- hiding the injected usage chunk -------------------------------------------------

_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_OBJECT_VALUE = re.compile(rb"\s*:\s*\{")
_EMPTY_LIST_VALUE = re.compile(rb"\s*:\s*\[\s*\]")
_EMPTY_LIST = re.compile(rb"\[\s*\]")


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


class UsageChunkFilter:
    """Removes the usage-only SSE event from what the client receives.

    Every other byte passes unchanged (``[DONE]``, comments, CRLF framing). An event is
    held back only until its terminating blank line arrives, since whether to drop it
    is known only then. A body that is not SSE (an error JSON) passes straight through.
    """

    __slots__ = ("_fast", "_passthrough", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._passthrough: bool | None = None
        self._fast = False
        """Known SSE and nothing held back: a piece of whole LF events may skip ``_feed``."""

    def feed(self, data: bytes) -> bytes:
        # The common piece passes as it is: it ends with a blank line (in LF or CRLF
        # framing, that ends an event), so nothing stays held back, and nothing in it
        # holds an empty list, so none of its events is the usage-only one.
        if self._fast and data[-2:] == b"\n\n" and _EMPTY_LIST.search(data) is None:
            return data
        out = self._feed(data)
        self._fast = self._passthrough is False and not self._pending
        return out

    def _feed(self, data: bytes) -> bytes:
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
        for m in _EVENT_END.finditer(buf, max(0, len(self._pending) - 3)):
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
