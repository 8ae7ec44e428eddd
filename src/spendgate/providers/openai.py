"""OpenAI wire format: chat completions, Responses, completions, embeddings.

Also serves Azure OpenAI (``/openai/deployments/{name}/...``) and every
OpenAI-compatible server (OpenRouter, Groq, DeepSeek, vLLM, Ollama's ``/v1``).

This module reads responses: :class:`OpenAIParser` recognises payloads by shape, not
by endpoint, so one class reads chat chunks, Responses events and plain JSON bodies
alike. It runs for every piece of every stream, so it is built to do as little as it
can per piece (see ``OpenAIParser.feed``). :class:`OpenAIAdapter` ties it to the
request side (:mod:`spendgate.providers.openai_request`: inspection and the
``include_usage`` rewrite) and to the filter that hides the usage chunk the rewrite
brings (:mod:`spendgate.providers.openai_filter`).
"""

from __future__ import annotations

import re
from typing import Any

from spendgate.providers._api import NullParser, RequestInfo, ResponseParser
from spendgate.providers._common import (
    FramedParser,
    JSONObject,
    SSEFramer,
    as_dict,
    as_list,
    count,
    ignore_note,
    nonempty_str,
    reported_usd,
    service_tier,
    str_len,
    tool_calls,
    with_extras,
)
from spendgate.providers.openai_filter import UsageChunkFilter, is_usage_only_event
from spendgate.providers.openai_request import OPERATIONS, classify, inspect_request
from spendgate.usage import Note, Usage, consistent

__all__ = [
    "OPERATIONS",
    "OpenAIAdapter",
    "OpenAIParser",
    "UsageChunkFilter",
    "classify",
    "is_usage_only_event",
    "map_usage",
    "message_chars",
    "output_tool_calls",
]


def map_usage(
    block: JSONObject, *, embeddings: bool = False, note: Note = ignore_note
) -> Usage | None:
    """OpenAI usage → spendgate usage; accepts both the chat and the Responses spelling.

    ``prompt_tokens``/``input_tokens`` already include cached tokens and
    ``completion_tokens``/``output_tokens`` already include reasoning (docs/reference.md §3).
    The audio and image parts of either (``*_tokens_details.audio_tokens`` /
    ``image_tokens``) and the cost OpenRouter reports (``cost``) go to ``extras``.
    A count that is not valid is not reported, and ``note`` is told (:func:`count`);
    cached tokens beyond the prompt are clamped to it (:func:`consistent`).
    """
    get = block.get
    inp = count(get("prompt_tokens"), "prompt_tokens", note)
    if inp is None:
        inp = count(get("input_tokens"), "input_tokens", note)
    out = count(get("completion_tokens"), "completion_tokens", note)
    if out is None:
        out = count(get("output_tokens"), "output_tokens", note)
    if out is None and embeddings and inp is not None:
        out = 0
    details = get("prompt_tokens_details")
    if type(details) is not dict:
        details = get("input_tokens_details")
    cached = audio_in = image_in = None
    if type(details) is dict:
        cached = count(details.get("cached_tokens"), "cached_tokens", note)
        audio_in = count(details.get("audio_tokens"), "audio_tokens", note)
        image_in = count(details.get("image_tokens"), "image_tokens", note)
    if cached is None and "prompt_cache_hit_tokens" in block:  # DeepSeek
        cached = count(get("prompt_cache_hit_tokens"), "prompt_cache_hit_tokens", note)
    details = get("completion_tokens_details")
    if type(details) is not dict:
        details = get("output_tokens_details")
    reasoning = audio_out = image_out = None
    if type(details) is dict:
        reasoning = count(details.get("reasoning_tokens"), "reasoning_tokens", note)
        audio_out = count(details.get("audio_tokens"), "audio_tokens", note)
        image_out = count(details.get("image_tokens"), "image_tokens", note)
    cost = reported_usd(get("cost"), "cost", note) if "cost" in block else None
    if inp is None and out is None and cached is None and reasoning is None:
        return None  # an empty block is no report
    usage = Usage(inp, out, cached, reasoning_tokens=reasoning)
    if audio_in or image_in or audio_out or image_out or cost:  # rare: skip the kwargs dict
        extra = with_extras(
            usage,
            input_audio_tokens=audio_in,
            input_image_tokens=image_in,
            output_audio_tokens=audio_out,
            output_image_tokens=image_out,
            provider_cost=cost,
        )
        assert extra is not None
        usage = extra
    if cached is None and reasoning is None and usage.extras is None:
        return usage
    return consistent(usage, note)


_OUTPUT_TOOLS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
}
"""Responses ``output`` items of the server-side tools billed per call (§4)."""


def output_tool_calls(output: Any) -> tuple[tuple[str, int], ...]:
    """Per-call tools a Responses ``output`` ran: each ``web_search_call`` and
    ``file_search_call`` item is one call; code interpreter is billed per container, so
    its calls count once per ``container_id`` (an item without one counts alone)."""
    calls: dict[str, int] = {}
    containers: set[str] = set()
    for item in as_list(output):
        if type(item) is not dict:
            continue
        kind = item.get("type")
        tool = _OUTPUT_TOOLS.get(kind) if type(kind) is str else None
        if tool is None:
            continue
        container = item.get("container_id")
        if tool == "code_interpreter" and type(container) is str:
            if container in containers:
                continue
            containers.add(container)
        calls[tool] = calls.get(tool, 0) + 1
    return tool_calls(calls)


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


# --- the parser's limits: what is held back unexamined, and for how long ----------------

MAX_PROBES = 4
"""Events framed one at a time from a piece while the model is still unknown. Every
recording names it by the third event (OpenRouter sends two ``:`` comments first,
Azure a ``prompt_filter_results`` chunk with ``"model": ""``); past this, a stream that
names none is simply framed, so the probing cannot cost a find and a slice per event."""
MAX_HELD = 1 << 16
"""Bytes of pieces held unexamined before they are looked at: the size of aiohttp's
read buffer (64 KiB), so a busy stream is examined about once per socket read and a
stream nobody settles holds no more than that."""
MAX_TAIL = MAX_HELD
"""A partial event longer than this goes to the framer instead of staying held: held
bytes are joined again on every release, so a long one would be copied once per piece.
At most ``MAX_HELD``, or the held tail alone would force a release on every piece."""
MAX_LAZY_BYTES = 1 << 20
"""Bytes of set-aside events counted in one batch: about 5,000 chat chunks, so the
batching keeps its saving, yet a stream nobody settles (live updates off) holds at most
about a mebibyte for the estimate."""
MAX_LAZY_PAYLOADS = 4096
"""Set-aside payloads of framed events counted in one batch: the same bound as
``MAX_LAZY_BYTES`` for events that came framed (about 200 bytes each, about 1 MiB)."""
RESPONSES_TYPE_WINDOW = 40
"""Bytes of a payload searched for ``"type":"response.``: OpenAI writes ``type`` first
(byte 1 in every recording), so a short look tells a Responses event without scanning
a large one; one that slips past is still read, just not skipped early."""
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def _usage_object_at(buf: bytes) -> int:
    """Where a ``"usage": {`` starts in ``buf`` (-1 if none): everything before its event
    can be set aside unparsed. The usage chunk is normally the last event, so one look
    from the end finds it; a regex scan runs only when the last ``"usage"`` holds no
    object (``null`` on every chunk of a stream still running)."""
    at = buf.rfind(b'"usage"')
    if at < 0 or _USAGE_OBJECT.match(buf, at):
        return at
    found = _USAGE_OBJECT.search(buf, 0, at)
    return -1 if found is None else found.start()


class OpenAIParser(FramedParser):
    """Chat chunks, Responses events, or one JSON body of any of the four endpoints.

    ``usage``, ``model`` and ``output_chars`` are plain reads: pieces may be held, and
    events set aside, unexamined (see ``feed``). ``close`` makes ``usage`` and ``model``
    final; ``settle`` (mid-stream or after ``close``) also counts ``output_chars``, which
    only an estimate needs.
    """

    def __init__(self, operation: str, model: str | None = None) -> None:
        super().__init__()
        self._embeddings = operation == "embeddings"
        self._search_model = operation == "chat" and model is not None and "-search-" in model
        """A chat search model (``gpt-4o-search-preview``): OpenAI bills each response
        one web search call (docs/reference.md §4)."""
        self._lazy: list[bytes] = []
        """Complete SSE events that cannot hold usage, framed only when settled."""
        self._lazy_size = 0
        self._lazy_payloads: list[bytes] = []
        """JSON payloads of such events, when they arrived framed in a larger piece."""
        self._counting = False
        """Set-aside events are being counted: they are older than any usage seen."""
        self._at_boundary = False
        """The framer holds no partial event (so bytes may bypass it)."""
        self._held: list[bytes] = []
        """Bytes not yet examined, from an event boundary on (see ``feed``)."""
        self._held_size = 0
        self._probes = 0
        """Events framed one at a time so far while looking for the model."""

    def _wanted(self, payload: bytes) -> bool:
        # Cheap byte checks before orjson: ``[DONE]`` and non-JSON lines are skipped,
        # and the large Responses events that repeat finished text (``*.done``,
        # ``output_item.added``) carry neither usage nor a delta.
        if payload[:1] != b"{":
            return payload.lstrip()[:1] == b"{"
        if b'"type":"response.' in payload[:RESPONSES_TYPE_WINDOW]:
            return b'"usage"' in payload or b'.delta"' in payload or self._model is None
        if self._model is not None and not self._counting and _USAGE_OBJECT.search(payload) is None:
            self._lazy_payloads.append(payload)  # a delta: parsed only when settled
            if len(self._lazy_payloads) >= MAX_LAZY_PAYLOADS:
                self._count_lazy()
            return False
        return True

    def feed(self, data: bytes) -> None:
        # Once the model is known and the framer sits between events, pieces are only
        # held: each is one list append. They are examined together by ``settle`` and
        # ``close`` or past MAX_HELD bytes, which turns a stream's per-chunk cost into
        # one scan of its bytes. A piece holding many events (a whole short stream
        # often arrives as one) has its first events framed one at a time until one
        # names the model, and the rest held.
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
        # Set-aside deltas stay uncounted: they matter only for an estimate, and a stream
        # that reported its usage (nearly all) never needs one. settle() counts them.

    def settle(self) -> None:
        self._release()
        if self._lazy or self._lazy_payloads:
            self._count_lazy()

    def _count_lazy(self) -> None:
        lazy, self._lazy, self._lazy_size = self._lazy, [], 0
        payloads, self._lazy_payloads = self._lazy_payloads, []
        self._counting = True
        try:
            framer = SSEFramer()  # the blocks are whole events: a fresh framer reads them
            for block in lazy:
                payloads.extend(framer.feed(block))
            self._payloads(payloads)
            problem = framer.problem()
            if problem:
                self._note(problem)
        finally:
            self._counting = False

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
            usage = map_usage(block, embeddings=self._embeddings, note=self._note)
            if usage is not None:
                tier = obj.get("service_tier")
                if tier is not None:
                    usage = with_extras(usage, service_tier=service_tier(tier, self._note))
                if self._search_model:  # a chat search model: one search per response
                    usage = with_extras(usage, tool_calls=(("web_search", 1),))
            self._usage = usage or self._usage

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
            usage = with_extras(
                map_usage(block, note=self._note),
                service_tier=service_tier(response.get("service_tier"), self._note),
                tool_calls=output_tool_calls(response.get("output")),
            )
            self._usage = usage or self._usage
        if body:
            self._output_chars += sum(
                _output_item_chars(i) for i in as_list(response.get("output"))
            )


class OpenAIAdapter:
    """OpenAI and every server that speaks its wire format."""

    name = "openai"
    error_style = "openai"

    inspect = staticmethod(inspect_request)

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser:
        if info.operation not in OPERATIONS:
            return NullParser()
        return OpenAIParser(info.operation, info.model)

    def output_filter(self, info: RequestInfo) -> UsageChunkFilter | None:
        return UsageChunkFilter() if info.strip_usage_chunk else None
