"""Ollama's native API (``/api/chat``, ``/api/generate``: NDJSON streams).

Ollama streams unless the request says ``"stream": false``. Usage is on the final
object (``done: true``). Its OpenAI-compatible ``/v1/...`` endpoints are handed to
the OpenAI logic, so the ollama route also works with OpenAI SDKs.
"""

from __future__ import annotations

from collections.abc import Mapping

from spendgate.providers._api import NullParser, OutputFilter, RequestInfo, ResponseParser
from spendgate.providers._common import (
    FramedParser,
    Framer,
    JSONObject,
    LineFramer,
    as_dict,
    as_list,
    count,
    json_len,
    largest_int,
    nonempty_str,
    read_object,
    reported,
    str_len,
    text_chars,
    unread_request,
)
from spendgate.providers.openai import OPERATIONS as OPENAI_OPERATIONS
from spendgate.providers.openai import OpenAIAdapter
from spendgate.usage import Usage

_OPERATIONS = {"/api/chat": "ollama_chat", "/api/generate": "ollama_generate"}
_PROMPT_KEYS = ("messages", "prompt", "system", "suffix", "tools")


class OllamaParser(FramedParser):
    """One JSON object per line; a non-streamed body is simply a single line."""

    ONE_JSON_DOCUMENT = False  # NDJSON: a line per object

    def _json_framer(self) -> Framer:
        return self._text_framer()

    def _text_framer(self) -> Framer:
        return LineFramer()

    def _handle(self, obj: JSONObject) -> None:
        if self._model is None:
            self._model = nonempty_str(obj.get("model"))
        message = as_dict(obj.get("message"))
        if message:
            self._output_chars += str_len(message.get("content")) + str_len(message.get("thinking"))
            for call in as_list(message.get("tool_calls")):
                fn = as_dict(call.get("function")) if isinstance(call, dict) else None
                if fn:
                    self._output_chars += json_len(fn.get("arguments"))
        self._output_chars += str_len(obj.get("response")) + str_len(obj.get("thinking"))
        if obj.get("done") is True:
            note = self._note
            prompt = count(obj.get("prompt_eval_count"), "prompt_eval_count", note)
            generated = count(obj.get("eval_count"), "eval_count", note)
            self._usage = reported(Usage(prompt, generated)) or self._usage


class OllamaAdapter:
    """A local Ollama server, native and OpenAI-compatible endpoints alike."""

    name = "ollama"
    error_style = "ollama"

    def __init__(self) -> None:
        self._openai = OpenAIAdapter()

    def inspect(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        *,
        inject_stream_usage: bool,
    ) -> RequestInfo:
        if path.startswith("/v1/"):
            return self._openai.inspect(
                method, path, query, body, inject_stream_usage=inject_stream_usage
            )
        op = _OPERATIONS.get(path.rstrip("/"))
        if method.upper() != "POST" or op is None:
            return RequestInfo(operation="other", body=body)
        obj = read_object(body)
        if obj is None:
            return unread_request(op, body, stream=True)  # Ollama streams by default
        stream = obj.get("stream")
        return RequestInfo(
            operation=op,
            model=nonempty_str(obj.get("model")),
            stream=stream if isinstance(stream, bool) else True,  # Ollama's default
            # num_predict -1 (no limit) and -2 (fill the context) are no bound: as_int
            # rejects negatives.
            max_output_tokens=largest_int(as_dict(obj.get("options")), ("num_predict",)),
            input_chars=text_chars(obj, _PROMPT_KEYS),
            body=body,
        )

    def parser(self, info: RequestInfo, status: int, content_type: str) -> ResponseParser:
        if info.operation in _OPERATIONS.values():
            return OllamaParser()
        if info.operation in OPENAI_OPERATIONS:
            return self._openai.parser(info, status, content_type)
        return NullParser()

    def output_filter(self, info: RequestInfo) -> OutputFilter | None:
        return self._openai.output_filter(info)
