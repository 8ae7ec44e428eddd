"""OpenAI requests: what a request body says, and the one rewrite spendgate makes.

Apart from the response side because it runs once per request, before anything goes
upstream, and changes the bytes sent: a streamed chat request that did not ask for
``stream_options.include_usage`` gets it added (otherwise OpenAI reports no usage in a
stream), and the :class:`RequestInfo` says so, so that the usage-only chunk it brings
is hidden from the client (:mod:`spendgate.providers.openai_filter`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import orjson

from spendgate.providers._api import RequestInfo
from spendgate.providers._common import (
    JSONObject,
    as_dict,
    choice_count,
    ignore_note,
    largest_int,
    loads_lenient,
    loads_object,
    nonempty_str,
    service_tier,
    text_chars,
    unread_request,
)

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
_CHOICE_KEYS = ("n", "best_of")  # completions bills best_of of them, returns n
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def classify(method: str, path: str) -> str:
    """The operation for a path; reads of stored objects (GET) are not generations."""
    if method.upper() != "POST":
        return "other"
    path = path.rstrip("/")
    for suffix, op in _OPERATIONS:
        if path.endswith(suffix):
            return op
    return "other"


def inspect_request(
    method: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    *,
    inject_stream_usage: bool,
) -> RequestInfo:
    """``Adapter.inspect`` for the OpenAI wire format (Azure's deployment path included)."""
    op = classify(method, path)
    if op == "other":
        return RequestInfo(operation="other", body=body)
    azure = _AZURE.search(path) if "/deployments/" in path else None
    deployment = azure.group(1) if azure else None
    # read_object, inline: the rewrite must know whether the body took the lenient path.
    obj = loads_object(body)
    lenient = obj is None
    if obj is None:
        obj = loads_lenient(body)
        if obj is None:
            return unread_request(op, body, deployment)
    if op == "responses" and obj.get("generate") is False:
        # Codex's prewarm: it opens each socket with a response.create that generates
        # nothing (to warm the cache and get a previous_response_id). Free, so no message.
        return RequestInfo(operation="other", body=body)
    stream = obj.get("stream") is True
    info = RequestInfo(
        operation=op,
        model=nonempty_str(obj.get("model")) or deployment,
        stream=stream,
        max_output_tokens=largest_int(obj, _MAX_KEYS),
        # Most requests ask for one: two lookups skip the call (this runs per request).
        choices=choice_count(obj, _CHOICE_KEYS) if "n" in obj or "best_of" in obj else 1,
        input_chars=text_chars(obj, _PROMPT_KEYS),
        body=body,
        service_tier=service_tier(obj["service_tier"], ignore_note)
        if "service_tier" in obj
        else None,
    )
    if op != "chat" or not stream or not inject_stream_usage:
        return info
    return _with_usage_chunk(info, obj, lenient)


def _with_usage_chunk(info: RequestInfo, obj: JSONObject, lenient: bool) -> RequestInfo:
    """A streamed chat request rewritten to get the usage chunk, unless it asked itself."""
    options = as_dict(obj.get("stream_options"))
    if options is not None and options.get("include_usage") is True:
        return info  # the client asked for the usage chunk itself: leave it alone
    # Absent or false: either way the client expects no usage chunk, so add and hide it.
    rewritten = _inject_include_usage(info.body, obj, lenient)
    if rewritten is None:
        return info
    return info._replace(body=rewritten, strip_usage_chunk=True)


def _inject_include_usage(body: bytes, obj: JSONObject, lenient: bool) -> bytes | None:
    """The body with ``stream_options.include_usage`` set, or None if it cannot be set.

    When the client sent no ``stream_options`` the key is spliced in after the opening
    brace so every other byte goes upstream untouched (a byte order mark stays first);
    otherwise the object is merged and re-serialized. A body only the lenient parser
    read is re-serialized by the stdlib, which writes back what it accepted (``NaN``,
    escaped lone surrogates, integers of any size), all in ASCII; orjson would turn
    ``NaN`` into ``null``. A UTF-16 or UTF-32 body is left alone: bytes spliced into it
    would break it.
    """
    options = obj.get("stream_options")
    if lenient and not json.detect_encoding(body).startswith("utf-8"):
        return None
    if options is None and "stream_options" not in obj:
        at = body.find(b"{") + 1  # in UTF-8 the first brace byte is the object's
        return body[:at] + _INCLUDE_USAGE + body[at:]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return None
    merged = {**obj, "stream_options": {**options, "include_usage": True}}
    try:
        if lenient:
            return json.dumps(merged, separators=(",", ":")).encode()
        return orjson.dumps(merged)
    except (TypeError, ValueError, RecursionError):
        return None
