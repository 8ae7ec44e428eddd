"""Google Gemini ``generateContent`` / ``streamGenerateContent`` (AI Studio and Vertex AI).

Streams come as SSE (``alt=sse``) or as one JSON array whose elements arrive over
time; both carry ``GenerateContentResponse`` objects. Every chunk may repeat
``usageMetadata``; counts can go *down* between chunks and Vertex sends blocks with
only ``trafficType``, so the last block with any count wins — never a max or a sum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from spendgate.providers._api import NullParser, RequestInfo, ResponseParser
from spendgate.providers._common import (
    FramedParser,
    Framer,
    JSONElementFramer,
    JSONObject,
    as_dict,
    as_list,
    choice_count,
    count,
    ignore_note,
    json_len,
    largest_int,
    nonempty_str,
    part,
    read_object,
    reported,
    service_tier,
    str_len,
    text_chars,
    total,
    unread_request,
    valid,
    with_extras,
)
from spendgate.usage import Note, Usage, consistent

# /v1beta/models/{m}:op, /v1/projects/p/locations/l/publishers/google/models/{m}:op
_PATH = re.compile(r"/(?:models|tunedModels)/([^/:]+):(generateContent|streamGenerateContent)$")
_OPERATIONS = {
    "generateContent": "generate_content",
    "streamGenerateContent": "stream_generate_content",
}
_PROMPT_KEYS = ("contents", "systemInstruction", "system_instruction", "tools")
_CONFIG_KEYS = ("generationConfig", "generation_config")
_MAX_KEYS = ("maxOutputTokens", "max_output_tokens")
_CHOICE_KEYS = ("candidateCount", "candidate_count")


def map_usage(meta: JSONObject, note: Note = ignore_note) -> Usage | None:
    """``usageMetadata`` → spendgate usage, or None for a block without counts.

    ``promptTokenCount`` includes cached tokens; tool-use prompt tokens (code
    execution, search) are input too. ``candidatesTokenCount`` excludes thoughts. A
    count that is not valid is not reported, nor is a sum it is part of (:func:`total`).
    """
    get = meta.get
    thoughts = part(get("thoughtsTokenCount"), "thoughtsTokenCount", note)
    prompt = part(get("promptTokenCount"), "promptTokenCount", note)
    tool_use = part(get("toolUsePromptTokenCount"), "toolUsePromptTokenCount", note)
    candidates = part(get("candidatesTokenCount"), "candidatesTokenCount", note)
    cached = part(get("cachedContentTokenCount"), "cachedContentTokenCount", note)
    usage = reported(
        Usage(
            input_tokens=total(prompt, tool_use),
            output_tokens=total(candidates, thoughts),
            cached_input_tokens=valid(cached),
            reasoning_tokens=valid(thoughts),
        )
    )
    if usage is None:
        return None
    tier = get("serviceTier")
    if tier is not None or "promptTokensDetails" in meta or "candidatesTokensDetails" in meta:
        usage = with_extras(
            usage,
            service_tier=service_tier(tier, note),
            input_audio_tokens=_modality(meta, "promptTokensDetails", "AUDIO", note),
            input_image_tokens=_modality(meta, "promptTokensDetails", "IMAGE", note),
            output_audio_tokens=_modality(meta, "candidatesTokensDetails", "AUDIO", note),
            output_image_tokens=_modality(meta, "candidatesTokensDetails", "IMAGE", note),
        )
    return None if usage is None else consistent(usage, note)


MAX_MODALITIES = 16
"""Entries of a ``*TokensDetails`` list read; there are five modalities, so more is
hostile and the rest is not read."""


def _modality(meta: JSONObject, key: str, modality: str, note: Note) -> int | None:
    """The ``tokenCount`` of ``modality`` in ``meta[key]`` (a list of ``{modality,
    tokenCount}``), summed if it appears twice; None if absent."""
    found = None
    for entry in as_list(meta.get(key))[:MAX_MODALITIES]:
        if type(entry) is dict and entry.get("modality") == modality:
            n = count(entry.get("tokenCount"), f"{key}.{modality}", note)
            if n is not None:
                found = (found or 0) + n
    return found


def _part_chars(part: Any) -> int:
    if not isinstance(part, dict):
        return 0
    n = str_len(part.get("text"))
    call = as_dict(part.get("functionCall"))
    if call:
        n += json_len(call.get("args"))
    code = as_dict(part.get("executableCode"))
    if code:
        n += str_len(code.get("code"))
    return n


class GeminiParser(FramedParser):
    """``GenerateContentResponse`` objects from SSE, a JSON array stream or one body."""

    ONE_JSON_DOCUMENT = False  # the JSON stream is an array of objects

    def _json_framer(self) -> Framer:
        return JSONElementFramer()

    def _handle(self, obj: JSONObject) -> None:
        model = nonempty_str(obj.get("modelVersion"))
        if model is not None:
            self._model = model
        for candidate in as_list(obj.get("candidates")):
            content = as_dict(candidate.get("content")) if isinstance(candidate, dict) else None
            if content:
                self._output_chars += sum(_part_chars(p) for p in as_list(content.get("parts")))
        meta = as_dict(obj.get("usageMetadata"))
        if meta is not None:
            self._usage = map_usage(meta, self._note) or self._usage


class GeminiAdapter:
    """The Gemini API; the model comes from the path, the response may name a version."""

    name = "gemini"
    error_style = "gemini"

    def inspect(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        *,
        inject_stream_usage: bool,
    ) -> RequestInfo:
        m = _PATH.search(path.rstrip("/"))
        if method.upper() != "POST" or m is None:
            return RequestInfo(operation="other", body=body)
        model, op = m.group(1), _OPERATIONS[m.group(2)]
        stream = op == "stream_generate_content"
        obj = read_object(body)
        if obj is None:
            return unread_request(op, body, model, stream)
        # Either spelling of the config, and of each field in it: the largest counts.
        configs = [c for k in _CONFIG_KEYS if (c := as_dict(obj.get(k))) is not None]
        bounds = [b for c in configs if (b := largest_int(c, _MAX_KEYS)) is not None]
        return RequestInfo(
            operation=op,
            model=model,
            stream=stream,
            max_output_tokens=max(bounds, default=None),
            choices=max((choice_count(c, _CHOICE_KEYS) for c in configs), default=1),
            input_chars=text_chars(obj, _PROMPT_KEYS),
            body=body,
        )

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser:
        if info.operation in _OPERATIONS.values():
            return GeminiParser()
        return NullParser()

    def output_filter(self, info: RequestInfo) -> None:
        return None
