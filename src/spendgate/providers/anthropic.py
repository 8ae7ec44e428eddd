"""Anthropic Messages API (JSON and SSE).

Anthropic's ``input_tokens`` exclude cache reads and writes, so spendgate's input is
the sum of all three (docs/reference.md §3). A stream reports usage twice —
``message_start`` and ``message_delta`` — and the later one may revise any field (server
tools raise ``input_tokens``), so fields are merged with the latest report of each winning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendgate.providers._api import NullParser, RequestInfo, ResponseParser
from spendgate.providers._common import (
    INVALID,
    FramedParser,
    JSONObject,
    as_dict,
    as_list,
    json_len,
    largest_int,
    nonempty_str,
    part,
    read_object,
    reported,
    service_tier,
    str_len,
    text_chars,
    tool_calls,
    total,
    unread_request,
    valid,
    with_extras,
)
from spendgate.usage import Usage, consistent

_FIELDS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens",
)
_SERVER_TOOLS = {
    "web_search_requests": "web_search",
    "code_execution_requests": "code_execution",
}
"""``usage.server_tool_use`` counts of the tools billed per call (§4); ``web_fetch``
costs nothing beyond its tokens."""
_DELTA_TEXT = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


def _block_chars(block: Any) -> int:
    """Generated characters in one content block of a JSON body."""
    if not isinstance(block, dict):
        return 0
    n = str_len(block.get("text")) + str_len(block.get("thinking"))
    if block.get("type") == "tool_use":
        n += json_len(block.get("input"))
    return n


class AnthropicParser(FramedParser):
    """Messages SSE events or one Messages JSON body."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, int] = {}
        self._tier: str | None = None
        """``usage.service_tier`` (``standard``, ``priority``, ``batch``), last one stated."""

    def _wanted(self, payload: bytes) -> bool:
        # ping, content_block_stop and message_stop carry nothing we count.
        return b'"delta"' in payload or b'"usage"' in payload or b'"content"' in payload

    def _handle(self, obj: JSONObject) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = as_dict(obj.get("delta"))
            key = _DELTA_TEXT.get(str(delta.get("type"))) if delta is not None else None
            if delta is not None and key is not None:
                self._output_chars += str_len(delta.get(key))
            return
        message = as_dict(obj.get("message")) if kind == "message_start" else obj
        if message is None:
            return
        if self._model is None and kind in ("message_start", "message"):
            self._model = nonempty_str(message.get("model"))
        if kind == "message":  # a whole JSON body
            self._output_chars += sum(_block_chars(b) for b in as_list(message.get("content")))
        block = as_dict(message.get("usage"))
        if block is not None:
            self._merge(block)

    def _merge(self, block: JSONObject) -> None:
        # A field reported invalid keeps the last valid value of it; with none, it stays
        # INVALID, so the sums that need it are not reported (:func:`total`).
        raw, note = self._raw, self._note
        for key in _FIELDS:
            value = part(block.get(key), key, note)
            if value is not None and (value != INVALID or key not in raw):
                raw[key] = value
        creation = as_dict(block.get("cache_creation"))
        if creation:
            one_hour = part(
                creation.get("ephemeral_1h_input_tokens"), "ephemeral_1h_input_tokens", note
            )
            if one_hour is not None and (one_hour != INVALID or "ephemeral_1h" not in raw):
                raw["ephemeral_1h"] = one_hour
        read = raw.get("cache_read_input_tokens")
        write = raw.get("cache_creation_input_tokens")
        usage = reported(
            Usage(
                input_tokens=total(raw.get("input_tokens"), read, write),
                output_tokens=valid(raw.get("output_tokens")),
                cached_input_tokens=valid(read),
                cache_write_tokens=valid(write),
                cache_write_1h_tokens=valid(raw.get("ephemeral_1h")),
            )
        )
        tier = block.get("service_tier")
        if tier is not None:
            self._tier = service_tier(tier, note) or self._tier
        tools = as_dict(block.get("server_tool_use"))
        if tools:
            for key in _SERVER_TOOLS:
                n = part(tools.get(key), key, note)
                if n is not None and (n != INVALID or key not in raw):
                    raw[key] = n
        if usage is not None:
            used = {t: n for k, t in _SERVER_TOOLS.items() if (n := valid(raw.get(k)))}
            usage = with_extras(usage, service_tier=self._tier, tool_calls=tool_calls(used))
            assert usage is not None
            self._usage = consistent(usage, note)


class AnthropicAdapter:
    """api.anthropic.com and anything that speaks the Messages API."""

    name = "anthropic"
    error_style = "anthropic"

    def inspect(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        *,
        inject_stream_usage: bool,
    ) -> RequestInfo:
        if method.upper() != "POST" or not path.rstrip("/").endswith("/messages"):
            return RequestInfo(operation="other", body=body)  # count_tokens, batches, models
        obj = read_object(body)
        if obj is None:
            return unread_request("messages", body)
        return RequestInfo(
            operation="messages",
            model=nonempty_str(obj.get("model")),
            stream=obj.get("stream") is True,
            max_output_tokens=largest_int(obj, ("max_tokens",)),
            input_chars=text_chars(obj, ("system", "messages", "tools")),
            body=body,
        )

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser:
        return AnthropicParser() if info.operation == "messages" else NullParser()

    def output_filter(self, info: RequestInfo) -> None:
        return None
