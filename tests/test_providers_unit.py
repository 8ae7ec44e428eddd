"""Adapter behaviour the recordings do not cover: the include_usage rewrite, hostile
input, request inspection and the framing edge cases."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.billing import estimated_counts
from spendgate.providers import ADAPTERS, _sse_decoder, get_adapter, openai
from spendgate.providers._api import MAX_NOTES, Adapter, NullParser, RequestInfo, ResponseParser
from spendgate.providers._common import (
    INVALID,
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_OUTPUT_TOKENS,
    MAX_PARSE_COST,
    JSONElementFramer,
    as_int,
    count,
    loads_lenient,
    parse_cost,
    part,
    shown,
    total,
)
from spendgate.providers._sse_decoder import MAX_EVENT_BYTES, SSEDecoder, SSEEvent
from spendgate.providers.anthropic import AnthropicAdapter
from spendgate.providers.gemini import GeminiAdapter
from spendgate.providers.ollama import OllamaAdapter
from spendgate.providers.openai import OpenAIAdapter, UsageChunkFilter
from spendgate.providers.openai_filter import MAX_PENDING
from spendgate.usage import MAX_TOKENS, Extras, Usage
from tests.paths import FIXTURES

OPENAI = OpenAIAdapter()
ANTHROPIC = AnthropicAdapter()
GEMINI = GeminiAdapter()
OLLAMA = OllamaAdapter()


def chat(body: dict[str, object], *, inject: bool = True) -> RequestInfo:
    return OPENAI.inspect(
        "POST", "/v1/chat/completions", {}, orjson.dumps(body), inject_stream_usage=inject
    )


def run(parser: ResponseParser, *pieces: bytes) -> ResponseParser:
    for piece in pieces:
        parser.feed(piece)
    parser.close()
    parser.settle()  # output_chars may be counted only when asked (an estimate asks)
    return parser


def sse(*objs: object) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def filtered(data: bytes, pieces: list[bytes] | None = None) -> bytes:
    f = UsageChunkFilter()
    return b"".join([*(f.feed(p) for p in pieces or [data]), f.close()])


# --- the include_usage rewrite ----------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def test_inject_adds_include_usage_and_keeps_every_other_byte() -> None:
    body = b'{"model": "gpt-4o",  "stream": true, "temperature": 1.50, "messages": []}'
    info = OPENAI.inspect("POST", "/v1/chat/completions", {}, body, inject_stream_usage=True)
    assert info.strip_usage_chunk and info.stream
    assert orjson.loads(info.body) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    assert info.body.replace(b'"stream_options":{"include_usage":true},', b"") == body


def test_inject_merges_existing_stream_options() -> None:
    info = chat({"model": "m", "stream": True, "stream_options": {"x": 1}, "messages": MESSAGES})
    assert orjson.loads(info.body)["stream_options"] == {"x": 1, "include_usage": True}
    assert info.strip_usage_chunk
    info = chat({"model": "m", "stream": True, "stream_options": None, "messages": MESSAGES})
    assert orjson.loads(info.body)["stream_options"] == {"include_usage": True}
    info = chat({"model": "m", "stream": True, "stream_options": {"include_usage": False}})
    assert orjson.loads(info.body)["stream_options"] == {"include_usage": True}
    assert info.strip_usage_chunk


@pytest.mark.parametrize(
    ("body", "inject"),
    [
        ({"model": "m", "stream": True, "stream_options": {"include_usage": True}}, True),
        ({"model": "m", "stream": True}, False),
        ({"model": "m", "stream": False}, True),
        ({"model": "m"}, True),
        ({"model": "m", "stream": True, "stream_options": "weird"}, True),
    ],
)
def test_no_rewrite(body: dict[str, object], inject: bool) -> None:
    raw = orjson.dumps(body)
    info = OPENAI.inspect("POST", "/v1/chat/completions", {}, raw, inject_stream_usage=inject)
    assert info.body == raw and not info.strip_usage_chunk
    assert OPENAI.output_filter(info) is None


def test_only_chat_is_rewritten() -> None:
    raw = orjson.dumps({"model": "m", "stream": True, "input": "x"})
    info = OPENAI.inspect("POST", "/v1/responses", {}, raw, inject_stream_usage=True)
    assert info.body == raw and not info.strip_usage_chunk


USAGE_CHUNK = {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 3}}
CONTENT_CHUNK = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "yo"}}]}


def test_filter_removes_exactly_the_usage_only_event_under_every_split() -> None:
    recorded = (FIXTURES / "openai/chat_stream_usage_gpt-4.sse").read_bytes()
    done = recorded.index(b"data: [DONE]")
    expected = recorded[: recorded.rindex(b"data: {", 0, done)] + recorded[done:]
    for data, want in [
        (recorded, expected),
        (recorded.replace(b"\n", b"\r\n"), expected.replace(b"\n", b"\r\n")),
        (b": keep-alive\n\n" + recorded, b": keep-alive\n\n" + expected),
    ]:
        assert b'"choices":[]' not in want
        assert filtered(data) == want
        for k in range(len(data) + 1):
            assert filtered(data, [data[:k], data[k:]]) == want, k
        assert filtered(data, [data[i : i + 1] for i in range(len(data))]) == want


def test_filter_passes_other_streams_byte_for_byte() -> None:
    for name in [
        "openai/chat_stream_nousage_gpt-5-nano.sse",
        "azure/chat_stream_content_filter_gpt-35-turbo.sse",  # first chunk: choices [] but no usage
        "openai_compatible/openrouter_chat_stream_cached_reasoning_grok-4.sse",  # usage + choices
    ]:
        data = (FIXTURES / name).read_bytes()
        assert filtered(data) == data
        assert filtered(data, [data[i : i + 7] for i in range(0, len(data), 7)]) == data


def test_filter_holds_an_event_only_until_its_end() -> None:
    f = UsageChunkFilter()
    assert f.feed(b'data: {"a": 1}\n') == b""
    assert f.feed(b"\ndata: [DO") == b'data: {"a": 1}\n\n'
    assert f.feed(b"NE]\n\n") == b"data: [DONE]\n\n"


def test_filter_drops_an_unterminated_usage_event_at_close_and_passes_json() -> None:
    content = b"data: " + orjson.dumps(CONTENT_CHUNK) + b"\n\n"
    assert filtered(content + b"data: " + orjson.dumps(USAGE_CHUNK)) == content
    error = b'{"error": "x",\n\n"choices": [],\n\n"usage": {}}'
    assert filtered(error, [error[:5], error[5:]]) == error


def test_stripped_stream_still_counts_usage() -> None:
    info = chat({"model": "m", "stream": True, "messages": MESSAGES})
    data = sse(CONTENT_CHUNK, USAGE_CHUNK)
    parser = run(OPENAI.parser(info, 200, "text/event-stream"), data)
    assert parser.usage == Usage(input_tokens=3)
    assert filtered(data) == sse(CONTENT_CHUNK)


# --- last report wins, never a sum ------------------------------------------------------


def test_openai_last_usage_wins() -> None:
    first = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    last = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), sse(first, last))
    assert parser.usage == Usage(input_tokens=7, output_tokens=2)


def _cumulative_chunk(i: int, usage: bool = True) -> dict[str, object]:
    """A chunk as servers with continuous usage stats send it: text and a running total."""
    block = {"prompt_tokens": 9, "completion_tokens": i + 1} if usage else None
    return {
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "abcd"}}],
        "usage": block,
    }


@pytest.mark.parametrize("last_null", [False, True])
def test_openai_running_usage_on_every_chunk_ends_at_the_latest(last_null: bool) -> None:
    # Held pieces are set aside up to a usage object, and counting them later (for the
    # estimate) must not bring back an older total; also when the stream's last chunk
    # says "usage": null after earlier objects.
    chunks = [_cumulative_chunk(i) for i in range(12)]
    if last_null:
        chunks.append(_cumulative_chunk(12, usage=False))
    data = sse(*chunks)
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    for step in (1, 2, 5, len(events)):
        parser = OPENAI.parser(chat({"stream": True}), 200, "text/event-stream")
        for at in range(0, len(events), step):
            parser.feed(b"".join(events[at : at + step]))
            parser.settle()  # releases what is held and counts what was set aside
            assert parser.usage is not None
            assert parser.output_chars > 0
        parser.close()
        parser.settle()
        assert parser.usage == Usage(input_tokens=9, output_tokens=12), step
        assert parser.output_chars == 4 * len(chunks), step


def test_openai_numbers_are_plain_reads_brought_up_to_date_by_settle() -> None:
    events = [b"data: " + orjson.dumps(_cumulative_chunk(i)) + b"\n\n" for i in range(12)]
    parser = OPENAI.parser(chat({"stream": True}), 200, "text/event-stream")
    for event in events:
        parser.feed(event)
    seen = (parser.usage, parser.model, parser.output_chars)
    assert (parser.usage, parser.model, parser.output_chars) == seen  # a read does no work
    parser.settle()
    final = (Usage(input_tokens=9, output_tokens=12), "m", 4 * len(events))
    assert (parser.usage, parser.model, parser.output_chars) == final
    parser.feed(b"data: [DONE]\n\n")
    parser.close()
    assert (parser.usage, parser.model) == final[:2]  # final after close
    parser.settle()
    assert (parser.usage, parser.model, parser.output_chars) == final


def test_anthropic_fields_merge_latest_per_field() -> None:
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x",'
        b'"usage":{"input_tokens":10,"cache_read_input_tokens":4,"output_tokens":1,'
        b'"cache_creation":{"ephemeral_1h_input_tokens":3}}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":20}}\n\n'
    )
    info = RequestInfo(operation="messages")
    parser = run(ANTHROPIC.parser(info, 200, ""), events)
    assert parser.usage == Usage(
        input_tokens=24, output_tokens=9, cached_input_tokens=4, cache_write_1h_tokens=3
    )
    assert parser.model == "claude-x"


def test_gemini_counts_may_go_down_and_empty_blocks_are_ignored() -> None:
    chunks = [
        {"usageMetadata": {"promptTokenCount": 15, "candidatesTokenCount": 9}},
        {"usageMetadata": {"promptTokenCount": 13, "candidatesTokenCount": 8}},
        {"usageMetadata": {"trafficType": "ON_DEMAND"}},
    ]
    info = RequestInfo(operation="stream_generate_content")
    parser = run(GEMINI.parser(info, 200, ""), sse(*chunks))
    assert parser.usage == Usage(input_tokens=13, output_tokens=8)


# --- hostile input ------------------------------------------------------------------------

ALL_PARSERS: list[tuple[Adapter, str]] = [
    (OPENAI, "chat"),
    (OPENAI, "responses"),
    (OPENAI, "completions"),
    (OPENAI, "embeddings"),
    (ANTHROPIC, "messages"),
    (GEMINI, "generate_content"),
    (GEMINI, "stream_generate_content"),
    (OLLAMA, "ollama_chat"),
    (OLLAMA, "ollama_generate"),
]
GARBAGE = [
    b'data: not json\n\ndata: {"usage": \n\n',
    b'data: \xff\xfe{"usage":{}}\n\n',
    b'data: {"choices": "nope", "usage": [1], "model": 5}\n\n',
    b'data: {"type": "message_start", "message": "x"}\n\n',
    b'data: {"type": "content_block_delta", "delta": ["x"]}\n\n',
    b'data: {"candidates": [null, {"content": {"parts": [7]}}], "usageMetadata": 3}\n\n',
    b'[{"candidates": {"x": 1}}, 5, "]", {"usageMetadata": null}]',
    b'{"done": true, "prompt_eval_count": "3", "message": {"content": 4}}\n\xff\n',
    b"]]]}}}",
    b"data: " + b"[" * 5000 + b"\n\n",
    b'{"model": "x", "usage": {"prompt_tokens": 1',  # truncated body
    b"",
]


@pytest.mark.parametrize(("adapter", "operation"), ALL_PARSERS)
def test_garbage_never_raises(adapter: Adapter, operation: str) -> None:
    info = RequestInfo(operation=operation)
    for data in GARBAGE:
        for pieces in ([data], [data[i : i + 3] for i in range(0, len(data), 3)]):
            parser = run(adapter.parser(info, 200, "text/event-stream"), *pieces)
            assert parser.usage is None, data
            assert parser.output_chars >= 0


def test_wrong_types_give_partial_usage() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": "12", "completion_tokens": 5}}
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), sse(chunk))
    assert parser.usage == Usage(output_tokens=5)
    chunk = {"choices": [], "usage": {"prompt_tokens": "12", "completion_tokens": True}}
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), sse(chunk))
    assert parser.usage is None


def test_as_int() -> None:
    assert [as_int(v) for v in (3, 0, 12.0, -1, True, "4", None, 1.5, [1])] == [
        3,
        0,
        12,
        None,
        None,
        None,
        None,
        None,
        None,
    ]


def test_truncated_stream_keeps_what_arrived() -> None:
    data = (FIXTURES / "anthropic/messages_stream_tools_claude-3-5-sonnet.sse").read_bytes()
    parser = run(ANTHROPIC.parser(RequestInfo(operation="messages"), 200, ""), data[:1500])
    assert parser.model == "claude-3-5-sonnet-20240620"
    assert parser.usage is not None and parser.usage.output_tokens == 5  # message_start's
    assert parser.output_chars > 0


def test_non_utf8_delta_spoils_only_its_event() -> None:
    good = {"choices": [{"delta": {"content": "abc"}}]}
    data = b'data: {"choices":[{"delta":{"content":"\xff"}}]}\n\n' + sse(good)
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), data)
    assert parser.output_chars == 3


@pytest.mark.parametrize(
    ("adapter", "path"),
    [
        (OPENAI, "/v1/chat/completions"),
        (OPENAI, "/openai/deployments/dep-1/chat/completions"),
        (ANTHROPIC, "/v1/messages"),
        (GEMINI, "/v1beta/models/gemini-2.5-flash:generateContent"),
        (OLLAMA, "/api/chat"),
        (OLLAMA, "/v1/chat/completions"),
    ],
)
@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b"\xff\xfe", b'{"model": 5, "stream": "yes", "max_tokens": "9"}'],
)
def test_malformed_request_bodies(adapter: Adapter, path: str, body: bytes) -> None:
    info = adapter.inspect("POST", path, {}, body, inject_stream_usage=True)
    assert info.metered and info.operation != "other"
    assert info.body == body and not info.strip_usage_chunk
    assert (info.max_output_tokens, info.choices) == (None, 1)
    assert info.unread is not body.startswith(b"{")  # the last one is an object
    if info.unread:
        assert info.input_chars == len(body)
    if adapter is OPENAI or adapter is ANTHROPIC:
        assert info.model in (None, "dep-1")


# --- request inspection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/responses", "responses"),
        ("POST", "/v1/completions", "completions"),
        ("POST", "/v1/embeddings/", "embeddings"),
        ("POST", "/api/v1/chat/completions", "chat"),
        ("POST", "/v1/files", "other"),
        ("GET", "/v1/chat/completions", "other"),
        ("GET", "/v1/responses/resp_1", "other"),
    ],
)
def test_openai_operations(method: str, path: str, operation: str) -> None:
    info = OPENAI.inspect(method, path, {}, b"{}", inject_stream_usage=True)
    assert info.operation == operation


def test_openai_request_fields() -> None:
    body = {
        "model": "gpt-4o",
        "stream": True,
        "max_completion_tokens": 50,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "abcd"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x" * 9999}}]},
        ],
    }
    info = chat(body)
    assert (info.model, info.stream, info.max_output_tokens) == ("gpt-4o", True, 50)
    assert info.input_chars == len("user" * 2 + "text" + "abcd" + "image_url")


def test_azure_model_falls_back_to_deployment() -> None:
    path = "/openai/deployments/my-dep/chat/completions"
    info = get_adapter("azure").inspect(
        "POST", path, {"api-version": "2024-02-01"}, b'{"messages": []}', inject_stream_usage=True
    )
    assert (info.operation, info.model) == ("chat", "my-dep")


def test_anthropic_request() -> None:
    body = orjson.dumps(
        {"model": "claude", "max_tokens": 64, "system": "sys", "messages": MESSAGES, "stream": True}
    )
    info = ANTHROPIC.inspect("POST", "/v1/messages", {}, body, inject_stream_usage=True)
    assert (info.operation, info.model, info.stream, info.max_output_tokens) == (
        "messages",
        "claude",
        True,
        64,
    )
    assert info.input_chars == len("sys" + "user" + "hi")
    count = ANTHROPIC.inspect(
        "POST", "/v1/messages/count_tokens", {}, body, inject_stream_usage=True
    )
    assert count.operation == "other"
    assert isinstance(ANTHROPIC.parser(count, 200, ""), NullParser)


@pytest.mark.parametrize(
    ("path", "operation", "model", "stream"),
    [
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            "generate_content",
            "gemini-2.5-flash",
            False,
        ),
        ("/v1beta/models/g:streamGenerateContent", "stream_generate_content", "g", True),
        (
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
            "stream_generate_content",
            "gemini-2.5-pro",
            True,
        ),
        ("/v1beta/models/g:countTokens", "other", None, False),
    ],
)
def test_gemini_paths(path: str, operation: str, model: str | None, stream: bool) -> None:
    body = (
        b'{"contents": [{"parts": [{"text": "hey"}]}], "generationConfig": {"maxOutputTokens": 7}}'
    )
    info = GEMINI.inspect("POST", path, {"alt": "sse"}, body, inject_stream_usage=True)
    assert (info.operation, info.model, info.stream) == (operation, model, stream)
    if operation != "other":
        assert (info.max_output_tokens, info.input_chars) == (7, 3)


def test_ollama_stream_defaults_to_true() -> None:
    def inspect(body: dict[str, object]) -> RequestInfo:
        raw = orjson.dumps(body)
        return OLLAMA.inspect("POST", "/api/chat", {}, raw, inject_stream_usage=True)

    assert inspect({"model": "llama3", "messages": MESSAGES}).stream is True
    assert inspect({"model": "llama3", "stream": False}).stream is False
    info = inspect({"model": "llama3", "options": {"num_predict": 12}})
    assert (info.operation, info.model, info.max_output_tokens) == ("ollama_chat", "llama3", 12)
    assert inspect({"model": "x", "options": {"num_predict": -1}}).max_output_tokens is None


def test_ollama_non_streamed_body_and_openai_paths() -> None:
    body = b'{"model":"llama3","response":"hello","done":true,"prompt_eval_count":4,"eval_count":2}'
    parser = run(OLLAMA.parser(RequestInfo(operation="ollama_generate"), 200, ""), body)
    assert (parser.usage, parser.model, parser.output_chars) == (
        Usage(input_tokens=4, output_tokens=2),
        "llama3",
        5,
    )
    raw = orjson.dumps({"model": "llama3", "stream": True, "messages": MESSAGES})
    info = OLLAMA.inspect("POST", "/v1/chat/completions", {}, raw, inject_stream_usage=True)
    assert (info.operation, info.strip_usage_chunk) == ("chat", True)
    assert OLLAMA.output_filter(info) is not None
    chunk = {
        "model": "llama3",
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
    }
    parser = run(OLLAMA.parser(info, 200, ""), sse(chunk))
    assert parser.usage == Usage(input_tokens=4, output_tokens=2)


# --- reservations: the largest output bound, choices, bodies orjson rejects ---------------


def openai_info(body: dict[str, object], path: str = "/v1/chat/completions") -> RequestInfo:
    return OPENAI.inspect("POST", path, {}, orjson.dumps(body), inject_stream_usage=True)


@pytest.mark.parametrize(
    ("fields", "bound"),
    [
        ({"max_tokens": 1, "max_completion_tokens": 4096}, 4096),
        ({"max_completion_tokens": 4096, "max_tokens": 1}, 4096),
        ({"max_output_tokens": 300, "max_tokens": 20}, 300),
        ({"max_tokens": 12.0}, 12),
        ({"max_tokens": True, "max_completion_tokens": 5}, 5),
        ({"max_tokens": -5, "max_completion_tokens": 3}, 3),
        ({"max_tokens": -5}, None),
        ({"max_tokens": "4096"}, None),
        ({"max_tokens": 1.5}, None),
        ({"max_tokens": None, "max_completion_tokens": 0}, 0),
        ({"max_tokens": 1e300}, MAX_OUTPUT_TOKENS),
        ({"max_tokens": MAX_OUTPUT_TOKENS + 1}, MAX_OUTPUT_TOKENS),
        ({}, None),
    ],
)
def test_openai_output_bound_is_the_largest_valid_limit(
    fields: dict[str, object], bound: int | None
) -> None:
    info = openai_info({"model": "gpt-4o", **fields})
    assert info.max_output_tokens == bound
    assert openai_info({"model": "gpt-4o", **fields}, "/v1/responses").max_output_tokens == bound


def test_an_integer_beyond_64_bits_is_capped() -> None:
    body = b'{"model": "gpt-4o", "max_tokens": 100000000000000000000000000000000000000}'
    info = OPENAI.inspect("POST", "/v1/completions", {}, body, inject_stream_usage=True)
    assert info.max_output_tokens == MAX_OUTPUT_TOKENS


@pytest.mark.parametrize(
    ("fields", "choices"),
    [
        ({"n": 4}, 4),
        ({"best_of": 3, "n": 2}, 3),
        ({"n": 2, "best_of": 3}, 3),
        ({"n": 5, "best_of": 1}, 5),
        ({"n": 1}, 1),
        ({"n": 0}, 1),
        ({"n": -2}, 1),
        ({"n": True}, 1),
        ({"n": "4"}, 1),
        ({"n": 2.0}, 2),
        ({"n": 1000}, MAX_CHOICES),
        ({}, 1),
    ],
)
def test_openai_choices(fields: dict[str, object], choices: int) -> None:
    assert openai_info({"model": "gpt-4o", **fields}).choices == choices
    assert openai_info({"model": "gpt-4o", **fields}, "/v1/completions").choices == choices


GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"


@pytest.mark.parametrize(
    ("body", "bound", "choices"),
    [
        ({"generationConfig": {"maxOutputTokens": 100, "candidateCount": 4}}, 100, 4),
        ({"generation_config": {"max_output_tokens": 200, "candidate_count": 3}}, 200, 3),
        ({"generationConfig": {"maxOutputTokens": 100, "max_output_tokens": 900}}, 900, 1),
        (
            {
                "generationConfig": {"maxOutputTokens": 100, "candidateCount": 2},
                "generation_config": {"max_output_tokens": 300},
            },
            300,
            2,
        ),
        ({"generationConfig": {}, "generation_config": {"maxOutputTokens": 8}}, 8, 1),
        ({"generationConfig": {"maxOutputTokens": False, "candidateCount": True}}, None, 1),
        ({"generationConfig": {"maxOutputTokens": -1, "candidateCount": -3}}, None, 1),
        ({"generationConfig": {"candidateCount": 500}}, None, MAX_CHOICES),
        ({"generationConfig": "nope"}, None, 1),
        ({}, None, 1),
    ],
)
def test_gemini_output_bound_and_candidates(
    body: dict[str, object], bound: int | None, choices: int
) -> None:
    info = GEMINI.inspect("POST", GEMINI_PATH, {}, orjson.dumps(body), inject_stream_usage=True)
    assert (info.max_output_tokens, info.choices) == (bound, choices)


@pytest.mark.parametrize(
    ("max_tokens", "bound"), [(64, 64), (True, None), (-1, None), (0.5, None), (10**9, 10**7)]
)
def test_anthropic_output_bound_and_one_choice(max_tokens: object, bound: int | None) -> None:
    body = orjson.dumps({"model": "claude", "max_tokens": max_tokens, "n": 4})
    info = ANTHROPIC.inspect("POST", "/v1/messages", {}, body, inject_stream_usage=True)
    assert (info.max_output_tokens, info.choices) == (bound, 1)


@pytest.mark.parametrize(
    ("num_predict", "bound"), [(128, 128), (-1, None), (-2, None), (True, None), ("9", None)]
)
def test_ollama_num_predict_minus_one_and_two_are_no_bound(
    num_predict: object, bound: int | None
) -> None:
    body = orjson.dumps({"model": "llama3", "options": {"num_predict": num_predict}, "n": 3})
    info = OLLAMA.inspect("POST", "/api/generate", {}, body, inject_stream_usage=True)
    assert (info.max_output_tokens, info.choices, info.unread) == (bound, 1, False)


BOM = b"\xef\xbb\xbf"
INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
STREAMED = (
    b'{"model": "gpt-4o", "stream": true, "max_tokens": 1, "max_completion_tokens": 64,'
    b' "n": 2, "messages": [{"role": "user", "content": "hi"}]}'
)
LENIENT = {
    "bom": BOM + STREAMED,
    "bom and whitespace": BOM + b" \r\n" + STREAMED,
    "lone surrogate escape": STREAMED.replace(b'"hi"', b'"hi \\ud800"'),
    "lone low surrogate escape": STREAMED.replace(b'"hi"', b'"\\udc00 hi"'),
    "raw surrogate bytes": STREAMED.replace(b'"hi"', b'"hi \xed\xa0\x80"'),
    "invalid utf-8": STREAMED.replace(b'"hi"', b'"hi \xff"'),
    "nan": STREAMED.replace(b'"n": 2', b'"temperature": NaN, "n": 2'),
    "infinity and bom": BOM + STREAMED.replace(b'"n": 2', b'"top_p": -Infinity, "n": 2'),
}


@pytest.mark.parametrize("body", LENIENT.values(), ids=LENIENT.keys())
def test_bodies_orjson_rejects_are_read_leniently_and_still_rewritten(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    info = OPENAI.inspect("POST", "/v1/chat/completions", {}, body, inject_stream_usage=True)
    read = (info.model, info.stream, info.max_output_tokens, info.choices, info.unread)
    assert read == ("gpt-4o", True, 64, 2, False)
    assert info.input_chars >= len("userhi")
    # include_usage is spliced in right after the brace (a BOM stays first), every
    # other byte untouched, and the result still reads as the original did
    assert info.strip_usage_chunk
    brace = body.index(b"{") + 1
    assert info.body == body[:brace] + INCLUDE_USAGE + body[brace:]
    rewritten = loads_lenient(info.body)
    assert rewritten is not None and rewritten["stream_options"] == {"include_usage": True}
    if b"\xff" not in body:  # what a server on Python's json reads (json.loads on bytes)
        assert json.loads(info.body)["stream_options"] == {"include_usage": True}


def test_a_lenient_body_with_stream_options_is_merged_by_the_stdlib() -> None:
    body = BOM + (
        b'{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false},'
        b' "temperature": NaN, "messages": [{"role": "user", "content": "hi \\ud800 \xc3\xa9"}]}'
    )
    info = OPENAI.inspect("POST", "/v1/chat/completions", {}, body, inject_stream_usage=True)
    assert info.strip_usage_chunk
    assert info.body.isascii()  # escapes everywhere: valid for every parser that read it
    assert b"NaN" in info.body and b"\\ud800" in info.body  # orjson would write null
    obj = json.loads(info.body)
    assert obj["stream_options"] == {"include_usage": True}
    assert obj["messages"][0]["content"] == "hi \ud800 \u00e9"


def test_a_utf16_body_is_read_but_not_rewritten() -> None:
    body = '{"model": "gpt-4o", "stream": true, "max_tokens": 9}'.encode("utf-16")
    info = OPENAI.inspect("POST", "/v1/chat/completions", {}, body, inject_stream_usage=True)
    assert (info.model, info.stream, info.max_output_tokens, info.unread) == (
        "gpt-4o",
        True,
        9,
        False,
    )
    assert info.body == body and not info.strip_usage_chunk  # a splice would break it


@pytest.mark.parametrize(
    ("adapter", "path"),
    [
        (ANTHROPIC, "/v1/messages"),
        (GEMINI, "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
        (OLLAMA, "/api/chat"),
    ],
)
@pytest.mark.parametrize("prefix", [BOM, b""])
def test_other_adapters_read_lenient_bodies(adapter: Adapter, path: str, prefix: bytes) -> None:
    body = prefix + (
        b'{"model": "m", "stream": true, "max_tokens": 5, "options": {"num_predict": 5},'
        b' "generationConfig": {"maxOutputTokens": 5, "candidateCount": 2},'
        b' "messages": [{"role": "user", "content": "x \\ud800"}]}'
    )
    info = adapter.inspect("POST", path, {}, body, inject_stream_usage=True)
    assert (info.stream, info.max_output_tokens, info.unread) == (True, 5, False)
    assert info.model == ("gemini-2.5-flash" if adapter is GEMINI else "m")
    assert info.choices == (2 if adapter is GEMINI else 1)
    assert info.body == body


UNREADABLE = [
    b"not json",
    b"{'model': 'gpt-4o'}",
    b'{"model": "gpt-4o", "max_tokens": 9,}',
    b'{"model": "gpt-4o" /* comment */}',
    BOM + b"[1, 2]",
    BOM + BOM + b'{"model": "gpt-4o"}',
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep for either parser
    b'{"max_tokens": ' + b"9" * 5000 + b"}",  # more digits than Python converts
]


@pytest.mark.parametrize(
    ("adapter", "path", "model", "stream"),
    [
        (OPENAI, "/v1/chat/completions", None, False),
        (OPENAI, "/openai/deployments/dep-1/chat/completions", "dep-1", False),
        (ANTHROPIC, "/v1/messages", None, False),
        (GEMINI, "/v1beta/models/g:streamGenerateContent", "g", True),
        (OLLAMA, "/api/generate", None, True),
    ],
)
@pytest.mark.parametrize("body", UNREADABLE, ids=range(len(UNREADABLE)))
def test_unreadable_body_is_marked_for_the_worst_case(
    adapter: Adapter, path: str, model: str | None, stream: bool, body: bytes
) -> None:
    assert loads_lenient(body) is None
    info = adapter.inspect("POST", path, {}, body, inject_stream_usage=True)
    assert info.unread and info.metered
    assert (info.model, info.stream) == (model, stream)  # what the path says
    assert (info.input_chars, info.max_output_tokens, info.choices) == (len(body), None, 1)
    assert info.body == body and not info.strip_usage_chunk


def test_read_bodies_are_not_unread() -> None:
    assert openai_info({"model": "gpt-4o"}).unread is False
    assert RequestInfo(operation="chat").unread is False  # the default


@pytest.mark.parametrize(
    ("adapter", "operation", "body"),
    [
        (OPENAI, "chat", sse({"model": "m", "choices": [], "usage": {"prompt_tokens": 4}})),
        (ANTHROPIC, "messages", sse({"type": "message_delta", "usage": {"input_tokens": 4}})),
        (GEMINI, "generate_content", sse({"usageMetadata": {"promptTokenCount": 4}})),
        (
            OLLAMA,
            "ollama_chat",
            b'{"model":"m","done":false}\n{"done":true,"prompt_eval_count":4}\n',
        ),
    ],
)
def test_parsers_frame_by_the_bytes_not_the_request_stream_flag(
    adapter: Adapter, operation: str, body: bytes
) -> None:
    for stream in (False, True):
        info = RequestInfo(operation=operation, stream=stream)
        for ctype in ("text/event-stream", "application/json", ""):
            parser = adapter.parser(info, 200, ctype)
            assert run(parser, body[:7], body[7:]).usage == Usage(input_tokens=4)
            whole = adapter.parser(info, 200, ctype)
            whole.feed_whole(body)
            assert whole.usage == Usage(input_tokens=4)


def test_registry() -> None:
    assert ADAPTERS["azure"] is ADAPTERS["openai"] is ADAPTERS["openai_compatible"]
    assert {a.error_style for a in ADAPTERS.values()} == {"openai", "anthropic", "gemini", "ollama"}
    with pytest.raises(KeyError, match="unknown adapter 'bedrock'"):
        get_adapter("bedrock")


def test_embeddings_and_json_bodies() -> None:
    info = RequestInfo(operation="embeddings")
    body = (
        b'{"object":"list","data":[],"model":"text-embedding-3-small",'
        b'"usage":{"prompt_tokens":8,"total_tokens":8}}'
    )
    parser = run(OPENAI.parser(info, 200, "application/json"), body[:10], body[10:])
    assert parser.usage == Usage(input_tokens=8, output_tokens=0)
    body = (
        b'{"object":"response","model":"gpt-5","output":[{"type":"message","content":'
        b'[{"type":"output_text","text":"hey"}]}],"usage":{"input_tokens":3,"output_tokens":9,'
        b'"output_tokens_details":{"reasoning_tokens":6}}}'
    )
    parser = run(OPENAI.parser(RequestInfo(operation="responses"), 200, ""), body)
    assert parser.usage == Usage(input_tokens=3, output_tokens=9, reasoning_tokens=6)
    assert (parser.model, parser.output_chars) == ("gpt-5", 3)


def test_responses_events_count_deltas_and_take_incomplete_usage() -> None:
    events = [
        {"type": "response.created", "response": {"model": "gpt-5", "usage": None}},
        {"type": "response.reasoning_summary_text.delta", "delta": "think"},
        {"type": "response.output_text.delta", "delta": "hi"},
        {"type": "response.function_call_arguments.delta", "delta": "{}"},
        {"type": "response.output_audio.delta", "delta": "QUJD"},  # base64 audio: not text
        {"type": "response.output_text.done", "text": "hi"},
        {
            "type": "response.incomplete",
            "response": {"model": "gpt-5", "usage": {"input_tokens": 4, "output_tokens": 16}},
        },
    ]
    parser = run(OPENAI.parser(RequestInfo(operation="responses"), 200, ""), sse(*events))
    assert (parser.usage, parser.model, parser.output_chars) == (
        Usage(input_tokens=4, output_tokens=16),
        "gpt-5",
        len("think" + "hi" + "{}"),
    )


def test_completions_and_gemini_function_calls() -> None:
    chunks = [
        {"model": "gpt-3.5-turbo-instruct", "choices": [{"text": "abc", "index": 0}]},
        {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
    ]
    parser = run(OPENAI.parser(RequestInfo(operation="completions"), 200, ""), sse(*chunks))
    assert (parser.usage, parser.model, parser.output_chars) == (
        Usage(input_tokens=2, output_tokens=1),
        "gpt-3.5-turbo-instruct",
        3,
    )
    call = {"functionCall": {"name": "f", "args": {"city": "Paris"}}}
    body = orjson.dumps({"candidates": [{"content": {"parts": [call]}}]})
    parser = run(GEMINI.parser(RequestInfo(operation="generate_content"), 200, ""), body)
    assert parser.output_chars == len(b'{"city":"Paris"}')


# --- the Gemini JSON-array stream ---------------------------------------------------------


def gemini_array_stream() -> tuple[bytes, bytes]:
    """The SSE recording re-framed as the JSON array Gemini sends without ``alt=sse``."""
    sse_data = (FIXTURES / "gemini/stream_gemini-2.0-flash-exp.sse").read_bytes()
    elements = [line[6:] for line in sse_data.split(b"\r\n") if line.startswith(b"data: ")]
    tricky = orjson.dumps({"candidates": [{"content": {"parts": [{"text": 'a "[{" \\ }]'}]}}]})
    return b"[" + b"\r\n,".join([tricky, *elements]) + b"]", sse_data


def test_gemini_array_stream_matches_sse_under_every_split() -> None:
    array, sse_data = gemini_array_stream()
    info = RequestInfo(operation="stream_generate_content")
    reference = run(GEMINI.parser(info, 200, ""), sse_data)
    for k in range(len(array) + 1):
        parser = run(GEMINI.parser(info, 200, "application/json"), array[:k], array[k:])
        assert parser.usage == reference.usage == Usage(input_tokens=13, output_tokens=8), k
        assert parser.model == "gemini-2.0-flash-exp"
        assert parser.output_chars == reference.output_chars + len('a "[{" \\ }]'), k


def test_element_framer_yields_elements_as_they_complete() -> None:
    framer = JSONElementFramer()
    assert framer.feed(b' [{"a": "}\\') == []
    assert framer.feed(b'""}, 1, ["x"') == [b'{"a": "}\\""}']
    assert framer.feed(b"]\r\n,{}] trailing {}") == [b'["x"]', b"{}"]
    assert framer.close() == []
    framer = JSONElementFramer()
    assert framer.feed(b'{"a": [1]} {"b": 2}') == [b'{"a": [1]}', b'{"b": 2}']
    assert JSONElementFramer().feed(b'"just a string" {}') == []
    framer = JSONElementFramer()  # a piece ends on a backslash in a string between elements
    assert framer.feed(b'["a\\') == []
    assert framer.feed(b'"]", {"x": 1}]') == [b'{"x": 1}']


# --- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize(("adapter", "operation"), ALL_PARSERS)
@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [b"data: ", b"\n", b"\r\n", b"{", b"}", b"[", b"]", b'"', b"\\", b'"usage":']
            ),
        ),
        max_size=30,
    )
)
def test_random_bytes_never_raise(adapter: Adapter, operation: str, data: list[bytes]) -> None:
    parser = adapter.parser(RequestInfo(operation=operation), 200, "")
    for piece in data:
        parser.feed(piece)
    parser.close()
    assert parser.output_chars >= 0
    _ = (parser.usage, parser.model)
    stream = b"".join(data)
    f = UsageChunkFilter()
    out = b"".join([*(f.feed(p) for p in data), f.close()])
    assert len(out) <= len(stream)


_EVENT = st.sampled_from(
    [
        b"data: " + orjson.dumps(CONTENT_CHUNK) + b"\n\n",
        b"data: " + orjson.dumps(USAGE_CHUNK) + b"\n\n",
        b": keep-alive\n\n",
        b"data: {not json\n\n",
        b'data: {"usage":{"x":1},"choices":[]\n\n',  # broken JSON that looks like usage
        b"data: \xff\xfe\n\n",
        b"event: x\r\ndata: " + orjson.dumps(CONTENT_CHUNK) + b"\r\n\r\n",
    ]
)


@given(events=st.lists(_EVENT, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_filter_property_only_usage_events_vanish(events: list[bytes], cuts: list[int]) -> None:
    """Whatever the stream and however it is split, the client gets every byte except
    the complete, valid usage-only events."""
    usage_only = b"data: " + orjson.dumps(USAGE_CHUNK) + b"\n\n"
    data = b"".join(events) + b"data: [DONE]\n\n"
    want = b"".join(e for e in events if e != usage_only) + b"data: [DONE]\n\n"
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert filtered(data, pieces) == want


# --- usage numbers validated where they enter (issue #16) ------------------------------------

# The hostile figures as usage counts: none is a token count, each is "not reported".
BAD_COUNTS: list[tuple[object, str]] = [
    (2**63, "usage out of range: {field}=9223372036854775808"),
    (1e300, "usage out of range: {field}=1e300"),
    (-5, "usage out of range: {field}=-5"),
    ("12", 'usage not an integer: {field}="12"'),
    (True, "usage not an integer: {field}=true"),
    (1.5, "usage not an integer: {field}=1.5"),
    (MAX_TOKENS + 1, "usage out of range: {field}=10000000001"),
    (float("inf"), "usage out of range: {field}=inf"),
    (float("nan"), "usage not an integer: {field}=nan"),
    ([3], "usage not an integer: {field}=a list"),
]


def test_count_accepts_token_counts_and_notes_everything_else() -> None:
    notes: list[str] = []
    assert [count(v, "f", notes.append) for v in (0, 7, 12.0, MAX_TOKENS, None)] == [
        0,
        7,
        12,
        MAX_TOKENS,
        None,
    ]
    assert notes == []
    for value, why in BAD_COUNTS:
        notes.clear()
        assert count(value, "f", notes.append) is None  # not reported
        assert part(value, "f", notes.append) == INVALID  # in a sum: spoils the sum
        assert notes == [why.format(field="f")] * 2
    assert total(3, None, 4) == 7 and total(None, None) is None and total(3, INVALID) is None
    assert shown("x" * 100) == '"xxxxxxxxxxxxxxxxxxxxxxxx..."'
    assert shown(2**200) == "an integer of 201 bits"
    assert shown("\x1b[31m\n") == '"\\u001b[31m\\n"'  # nothing unprintable reaches a log


def parse(adapter: Adapter, operation: str, data: bytes) -> ResponseParser:
    return run(adapter.parser(RequestInfo(operation=operation), 200, ""), data)


def _openai_usage(block: dict[str, Any]) -> bytes:
    return sse({"model": "m", "choices": [], "usage": block})


def _anthropic_usage(block: dict[str, Any]) -> bytes:
    start = {"type": "message_start", "message": {"model": "claude-x", "usage": block}}
    return b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"


def _gemini_usage(block: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"modelVersion": "g", "usageMetadata": block}) + b"\n\n"


def _ollama_usage(block: dict[str, Any]) -> bytes:
    return orjson.dumps({"model": "llama", "done": True, **block}) + b"\n"


USAGE_FORMS = [
    # adapter, operation, how a usage block is sent, its input and output field names
    (OPENAI, "chat", _openai_usage, "prompt_tokens", "completion_tokens"),
    (OPENAI, "responses", _openai_usage, "input_tokens", "output_tokens"),
    (ANTHROPIC, "messages", _anthropic_usage, "input_tokens", "output_tokens"),
    (GEMINI, "stream_generate_content", _gemini_usage, "promptTokenCount", "candidatesTokenCount"),
    (OLLAMA, "ollama_chat", _ollama_usage, "prompt_eval_count", "eval_count"),
]


@pytest.mark.parametrize(("adapter", "operation", "wrap", "inp", "out"), USAGE_FORMS)
@pytest.mark.parametrize(("value", "why"), BAD_COUNTS, ids=[repr(v)[:12] for v, _ in BAD_COUNTS])
def test_an_invalid_count_is_not_reported_and_noted(
    adapter: Adapter, operation: str, wrap: Any, inp: str, out: str, value: object, why: str
) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        return  # not JSON: orjson refuses it (the NaN/Infinity test below sends it as text)
    parser = run(
        adapter.parser(RequestInfo(operation=operation), 200, ""), wrap({inp: value, out: 5})
    )
    assert parser.usage is not None
    assert parser.usage.input_tokens is None  # not reported: the row is an estimate
    assert parser.usage.output_tokens == 5
    assert parser.notes == [why.format(field=inp)]


@pytest.mark.parametrize(("adapter", "operation", "wrap", "inp", "out"), USAGE_FORMS)
def test_nan_and_infinity_as_python_servers_write_them(
    adapter: Adapter, operation: str, wrap: Any, inp: str, out: str
) -> None:
    # Python's json.dumps writes NaN and Infinity; orjson refuses such an event, which is
    # read again as Python reads it, so its count is refused rather than the event lost.
    for text, why in (
        (b"NaN", "not an integer"),
        (b"Infinity", "out of range"),
        (b"1e400", "out of range"),
    ):
        data = wrap({inp: 7, out: 5}).replace(b"7", text, 1)
        parser = run(adapter.parser(RequestInfo(operation=operation), 200, ""), data)
        assert parser.usage is not None and parser.usage.input_tokens is None, text
        assert parser.usage.output_tokens == 5
        assert parser.notes and parser.notes[0].startswith(f"usage {why}: {inp}="), parser.notes


def test_openai_cached_beyond_the_prompt_is_clamped() -> None:
    # The figure: 999,999 cached tokens against 0 input, billed $1.25 before.
    block = {"prompt_tokens": 0, "completion_tokens": 0}
    block["prompt_tokens_details"] = {"cached_tokens": 999_999}  # type: ignore[assignment]
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), _openai_usage(block))
    assert parser.usage == Usage(input_tokens=0, output_tokens=0, cached_input_tokens=0)
    assert parser.notes == ["cached tokens beyond the input: 999999 > 0, clamped to 0"]
    reasoning = {"prompt_tokens": 5, "completion_tokens": 2}
    reasoning["completion_tokens_details"] = {"reasoning_tokens": 9}  # type: ignore[assignment]
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), _openai_usage(reasoning))
    assert parser.usage == Usage(input_tokens=5, output_tokens=2, reasoning_tokens=2)


def test_gemini_cached_beyond_the_prompt_is_clamped_and_a_bad_part_spoils_its_sum() -> None:
    meta: dict[str, Any] = {
        "promptTokenCount": 10,
        "cachedContentTokenCount": 50,
        "candidatesTokenCount": 1,
    }
    parser = parse(GEMINI, "generate_content", _gemini_usage(meta))
    assert parser.usage == Usage(input_tokens=10, output_tokens=1, cached_input_tokens=10)
    assert parser.notes == ["cached tokens beyond the input: 50 > 10, clamped to 10"]
    meta = {"promptTokenCount": 1e300, "toolUsePromptTokenCount": 4, "candidatesTokenCount": 1}
    parser = parse(GEMINI, "generate_content", _gemini_usage(meta))
    assert parser.usage is not None and parser.usage.input_tokens is None  # not 4


def test_anthropic_cache_reads_are_added_so_never_beyond_the_input() -> None:
    # Anthropic's cache reads and writes are apart from input_tokens and added to it, so
    # a large cache read is a large input, not an inconsistency.
    block: dict[str, Any] = {
        "input_tokens": 0,
        "cache_read_input_tokens": 999_999,
        "output_tokens": 1,
    }
    parser = parse(ANTHROPIC, "messages", _anthropic_usage(block))
    assert parser.usage == Usage(input_tokens=999_999, output_tokens=1, cached_input_tokens=999_999)
    assert parser.notes == []
    block = {
        "input_tokens": 1,
        "cache_creation_input_tokens": 5,
        "cache_creation": {"ephemeral_1h_input_tokens": 8},
        "output_tokens": 1,
    }
    parser = parse(ANTHROPIC, "messages", _anthropic_usage(block))
    assert parser.usage is not None and parser.usage.cache_write_1h_tokens == 5
    assert parser.notes == ["1-hour cache writes beyond the cache writes: 8 > 5, clamped"]


def test_anthropic_a_bad_later_count_keeps_the_earlier_one_and_a_bad_part_spoils_input() -> None:
    start = _anthropic_usage({"input_tokens": 10, "output_tokens": 1})
    usage = {"input_tokens": -5, "output_tokens": 9}
    delta = b"data: " + orjson.dumps({"type": "message_delta", "usage": usage}) + b"\n\n"
    parser = parse(ANTHROPIC, "messages", start + delta)
    assert parser.usage == Usage(input_tokens=10, output_tokens=9)
    assert parser.notes == ["usage out of range: input_tokens=-5"]
    block = {"input_tokens": 10, "cache_read_input_tokens": 2**63, "output_tokens": 1}
    parser = parse(ANTHROPIC, "messages", _anthropic_usage(block))
    assert parser.usage == Usage(input_tokens=None, output_tokens=1)  # not 10: a part is unknown


def test_notes_are_distinct_and_bounded() -> None:
    chunks = [
        {"choices": [], "usage": {"prompt_tokens": -i, "completion_tokens": 1}}
        for i in range(1, 50)
    ]
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), sse(*chunks, *chunks))
    assert len(parser.notes) == MAX_NOTES
    assert parser.notes[0] == "usage out of range: prompt_tokens=-1"


def test_estimates_hold_reported_breakdowns_within_the_estimated_input() -> None:
    info = RequestInfo(operation="chat", input_chars=40)  # an estimate of 10 input tokens
    counts = estimated_counts(info, Usage(cached_input_tokens=999_999, reasoning_tokens=7), 8)
    assert (counts.input_tokens, counts.cached_input_tokens) == (10, 10)
    assert (counts.output_tokens, counts.reasoning_tokens) == (2, 2)


# --- every buffer an upstream controls is bounded and linear (issue #16) -----------------------


def test_a_line_with_no_end_is_held_up_to_the_cap_then_skipped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a":1}\n\ndata: ' + b"x" * 1000) == [
        SSEEvent("message", b'{"a":1}')
    ]
    piece = b"x" * (1 << 16)
    for _ in range((MAX_EVENT_BYTES >> 16) + 8):  # past the cap: 8 MiB and more
        assert decoder.feed(piece) == []
        assert decoder._held <= MAX_EVENT_BYTES  # never more than the cap
    assert decoder.skipped == 1
    assert decoder.feed(b"x\ndata: dropped too\n\ndata: next\n\n") == [SSEEvent("message", b"next")]
    assert decoder.close() == []


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_an_oversized_line_ending_at_a_piece_edge_dispatches_nothing_spurious(end: bytes) -> None:
    with mock.patch.object(_sse_decoder, "MAX_EVENT_BYTES", 16):
        decoder = SSEDecoder()
        decoder.feed(b"event: big\ndata: " + b"y" * 40)
        assert decoder.skipped == 1
        events = decoder.feed(b"y" * 5 + end[:1])  # a CR here may be half of a CRLF
        events += decoder.feed(end[1:] + end + b"data: after\n\n")  # a blank line, then one
        assert events == [SSEEvent("message", b"after")]


def test_an_event_of_many_small_lines_is_dropped_past_the_cap() -> None:
    with mock.patch.object(_sse_decoder, "MAX_EVENT_BYTES", 100):
        decoder = SSEDecoder()
        for _ in range(30):
            assert decoder.feed(b"data: 0123456789\n") == []
        assert decoder.skipped == 1
        assert decoder.feed(b"\ndata: ok\n\n") == [SSEEvent("message", b"ok")]
        # The same lines in one event below the cap still make one event, in any pieces.
        decoder = SSEDecoder()
        lines = b"data: 0123456789\n" * 5 + b"\n"
        events = [e for i in range(len(lines)) for e in decoder.feed(lines[i : i + 1])]
        assert events == [SSEEvent("message", b"\n".join([b"0123456789"] * 5))]


@pytest.mark.parametrize(
    ("adapter", "operation"),
    [(OPENAI, "chat"), (ANTHROPIC, "messages"), (GEMINI, "stream_generate_content")],
)
def test_a_giant_sse_line_costs_one_pass_and_the_usage_after_it_still_counts(
    adapter: Adapter, operation: str
) -> None:
    usage = {
        "chat": _openai_usage({"prompt_tokens": 3, "completion_tokens": 2}),
        "messages": _anthropic_usage({"input_tokens": 3, "output_tokens": 2}),
        "stream_generate_content": _gemini_usage(
            {"promptTokenCount": 3, "candidatesTokenCount": 2}
        ),
    }[operation]
    parser = adapter.parser(RequestInfo(operation=operation), 200, "text/event-stream")
    parser.feed(b"data: " + b"x" * 100)
    piece = b"x" * (1 << 16)
    for _ in range(64 << 4):  # a 64 MiB line with no newline
        parser.feed(piece)
    parser.feed(b"\n\n" + usage)
    parser.close()
    assert parser.usage is not None and parser.usage.total_tokens == 5
    assert parser.notes == ["oversized SSE events skipped: 1 over 8 MiB, usage may be missing"]


def test_an_oversized_ndjson_line_is_skipped_and_the_next_one_read() -> None:
    parser = OLLAMA.parser(RequestInfo(operation="ollama_chat"), 200, "application/x-ndjson")
    parser.feed(b'{"model":"llama","message":{"content":"hi"}}\n{"message":{"content":"')
    for _ in range((MAX_EVENT_BYTES >> 16) + 2):
        parser.feed(b"x" * (1 << 16))
    parser.feed(b'"}}\n' + _ollama_usage({"prompt_eval_count": 4, "eval_count": 2}))
    parser.close()
    assert parser.usage == Usage(input_tokens=4, output_tokens=2)
    assert parser.notes == ["oversized NDJSON lines skipped: 1 over 8 MiB, usage may be missing"]


def test_a_json_body_past_the_buffer_is_not_parsed_and_noted() -> None:
    parser = OPENAI.parser(RequestInfo(operation="chat"), 200, "application/json")
    parser.feed(b'{"model":"m","x":"')
    piece = b"x" * (1 << 20)  # one object, held many times over: little memory
    for _ in range(MAX_BODY_BYTES >> 20):
        parser.feed(piece)
    parser.feed(b'","usage":{"prompt_tokens":1,"completion_tokens":1}}')
    parser.close()
    assert parser.usage is None
    assert parser.notes == ["JSON body over 64 MiB: not parsed"]


def test_a_dense_json_body_is_refused_before_it_is_parsed() -> None:
    # 3 MiB of empty objects would take about 90 MB parsed; text of 4 MiB parses.
    tail = b'],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    dense = b'{"model":"m","x":[' + b"{}," * (2 << 19) + b"0" + tail
    assert parse_cost(dense, MAX_PARSE_COST) > MAX_PARSE_COST
    parser = OPENAI.parser(RequestInfo(operation="chat"), 200, "application/json")
    parser.feed_whole(dense)
    assert parser.usage is None
    assert parser.notes == [
        f"JSON too dense to parse: a payload of {len(dense):,} bytes would take over 64 MiB "
        "parsed, usage may be missing"
    ]
    text = b'{"model":"m","x":["' + b"QUJD" * (1 << 20) + b'"' + tail
    parser = OPENAI.parser(RequestInfo(operation="chat"), 200, "application/json")
    parser.feed_whole(text)
    assert parser.usage == Usage(input_tokens=1, output_tokens=1) and parser.notes == []


def test_the_filter_passes_an_oversized_event_and_still_drops_the_usage_chunk() -> None:
    usage_only = b"data: " + orjson.dumps(USAGE_CHUNK) + b"\n\n"
    content = b"data: " + orjson.dumps(CONTENT_CHUNK) + b"\n\n"
    for end in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        big = b"data: " + b"z" * (3 * MAX_PENDING) + end
        data = content + big + usage_only + b"data: [DONE]\n\n"
        want = content + big + b"data: [DONE]\n\n"
        for step in (1000, 4096, MAX_PENDING + 1, len(data)):
            f = UsageChunkFilter()
            out = b""
            for i in range(0, len(data), step):
                out += f.feed(data[i : i + step])
                assert len(f._pending) <= MAX_PENDING + step  # held back: bounded
            assert out + f.close() == want, (end, step)


# --- fuzzing the bounds ---------------------------------------------------------------------

_ODD_NUMBER: st.SearchStrategy[object] = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [2**63, 2**64, 1e300, -5, "12", True, False, None, [], {}, MAX_TOKENS, MAX_TOKENS + 1]
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    form=st.sampled_from(USAGE_FORMS),
    values=st.lists(_ODD_NUMBER, min_size=2, max_size=6),
    cached=_ODD_NUMBER,
)
def test_property_any_usage_numbers_give_valid_consistent_counts(
    form: tuple[Any, ...], values: list[object], cached: object
) -> None:
    """Whatever numbers an upstream reports, each count that comes out is a whole number
    within the bound, every breakdown within its total, and the notes are few."""
    adapter, operation, wrap, inp, out = form
    extras: dict[str, dict[str, Any]] = {
        "chat": {
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": values[-1]},
        },
        "responses": {"input_tokens_details": {"cached_tokens": cached}},
        "messages": {
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": values[-1],
            "cache_creation": {"ephemeral_1h_input_tokens": values[0]},
        },
        "stream_generate_content": {
            "cachedContentTokenCount": cached,
            "thoughtsTokenCount": values[-1],
            "toolUsePromptTokenCount": values[0],
        },
        "ollama_chat": {},
    }
    extra = extras[operation]
    block = json.dumps({inp: values[0], out: values[1], **extra}).encode()  # NaN as Python
    data = wrap({"__block__": 0}).replace(b'{"__block__":0}', block)
    parser = run(adapter.parser(RequestInfo(operation=operation), 200, ""), data)
    assert len(parser.notes) <= MAX_NOTES
    usage = parser.usage
    if usage is None:
        return
    for value in usage:
        assert value is None or (type(value) is int and 0 <= value <= 3 * MAX_TOKENS)
    c = usage.counts()
    if usage.input_tokens is not None:
        assert c.cached_input_tokens + c.cache_write_tokens <= c.input_tokens
    if usage.output_tokens is not None:
        assert c.reasoning_tokens <= c.output_tokens
    if usage.cache_write_tokens is not None:
        assert c.cache_write_1h_tokens <= c.cache_write_tokens


def test_a_responses_request_that_generates_nothing_is_free() -> None:
    """Codex opens each WebSocket with ``generate: false`` (a prewarm): no message."""
    adapter = get_adapter("openai")
    body = b'{"type": "response.create", "model": "gpt-5.5", "generate": false, "input": []}'
    assert (
        adapter.inspect("POST", "/v1/responses", {}, body, inject_stream_usage=True).operation
        == "other"
    )
    body = body.replace(b"false", b"true")
    assert (
        adapter.inspect("POST", "/v1/responses", {}, body, inject_stream_usage=True).operation
        == "responses"
    )


# --- what a response reports besides its token totals (usage.Extras) ---------------------


def test_openai_service_tier_audio_image_and_openrouter_cost() -> None:
    chunk = {
        "model": "gpt-audio",
        "service_tier": "priority",
        "choices": [],
        "usage": {
            "prompt_tokens": 800,
            "completion_tokens": 550,
            "prompt_tokens_details": {"audio_tokens": 700, "image_tokens": 50},
            "completion_tokens_details": {"audio_tokens": 400},
            "cost": 0.00333825,
        },
    }
    parser = run(OPENAI.parser(chat({"stream": True}), 200, ""), sse(chunk))
    assert parser.usage == Usage(
        input_tokens=800,
        output_tokens=550,
        extras=Extras(
            service_tier="priority",
            input_audio_tokens=700,
            input_image_tokens=50,
            output_audio_tokens=400,
            provider_cost=Decimal("0.00333825"),
        ),
    )


@pytest.mark.parametrize(
    ("tier", "cost", "noted"),
    [
        ("x" * 40, 0.5, "service tier not understood"),
        ({"tier": "flex"}, 0.5, "service tier not understood"),
        ("../etc", 0.5, "service tier not understood"),
        ("flex", -1, "reported cost not taken: cost=-1"),
        ("flex", 1e300, "reported cost not taken"),
        ("flex", "0.5", "reported cost not taken"),
        ("flex", True, "reported cost not taken"),
    ],
)
def test_hostile_tiers_and_costs_are_not_taken_and_noted(
    tier: object, cost: object, noted: str
) -> None:
    notes: list[str] = []
    block = {"prompt_tokens": 5, "completion_tokens": 1, "cost": cost}
    usage = openai.map_usage(block, note=notes.append)
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (5, 1)
    parser = run(
        OPENAI.parser(chat({"stream": True}), 200, ""),
        sse({"model": "m", "service_tier": tier, "choices": [], "usage": block}),
    )
    assert parser.usage is not None
    extras = parser.usage.extras or Extras()
    assert extras.service_tier in (None, "flex")
    assert extras.provider_cost in (None, Decimal("0.5"))
    assert any(noted in n for n in [*notes, *parser.notes]), (notes, parser.notes)


def test_modality_counts_beyond_their_totals_are_clamped_and_noted() -> None:
    notes: list[str] = []
    block = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": {"audio_tokens": 50},
        "completion_tokens_details": {"audio_tokens": 3, "image_tokens": 9},
    }
    usage = openai.map_usage(block, note=notes.append)
    assert usage is not None and usage.extras is not None
    assert usage.extras.input_audio_tokens == 10
    assert (usage.extras.output_audio_tokens, usage.extras.output_image_tokens) == (3, 1)
    assert any("audio/image tokens beyond" in n for n in notes)


def test_responses_output_tool_calls() -> None:
    output = [
        {"type": "web_search_call", "status": "completed"},
        {"type": "web_search_call", "status": "completed"},
        {"type": "file_search_call"},
        {"type": "code_interpreter_call", "container_id": "c1"},
        {"type": "code_interpreter_call", "container_id": "c1"},  # the same container
        {"type": "code_interpreter_call", "container_id": "c2"},
        {"type": "message"},
        "junk",
        {"type": ["web_search_call"]},
    ]
    assert openai.output_tool_calls(output) == (
        ("code_interpreter", 2),
        ("file_search", 1),
        ("web_search", 2),
    )
    assert openai.output_tool_calls("not a list") == ()
    done = {
        "type": "response.completed",
        "response": {
            "model": "gpt-5",
            "service_tier": "flex",
            "output": output[:2],
            "usage": {"input_tokens": 9, "output_tokens": 3},
        },
    }
    info = RequestInfo(operation="responses", stream=True)
    parser = run(OPENAI.parser(info, 200, ""), sse(done))
    assert parser.usage is not None
    assert parser.usage.extras == Extras(service_tier="flex", tool_calls=(("web_search", 2),))


def test_a_chat_search_model_is_one_web_search_per_response() -> None:
    info = chat({"model": "gpt-4o-search-preview"})
    body = {"model": "gpt-4o-search-preview", "choices": [], "usage": {"prompt_tokens": 3}}
    parser = run(OPENAI.parser(info, 200, ""), orjson.dumps(body))
    assert parser.usage is not None and parser.usage.extras is not None
    assert parser.usage.extras.tool_calls == (("web_search", 1),)


def test_anthropic_server_tools_and_tier_across_events() -> None:
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x",'
        b'"usage":{"input_tokens":10,"output_tokens":1,"service_tier":"priority"}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9,'
        b'"server_tool_use":{"web_search_requests":3,"web_fetch_requests":2}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":12,'
        b'"server_tool_use":{"web_search_requests":-4}}}\n\n'
    )
    parser = run(ANTHROPIC.parser(RequestInfo(operation="messages"), 200, ""), events)
    assert parser.usage == Usage(
        input_tokens=10,
        output_tokens=12,
        extras=Extras(service_tier="priority", tool_calls=(("web_search", 3),)),
    )
    assert any("web_search_requests=-4" in n for n in parser.notes)  # the last valid one kept


def test_gemini_modalities_and_service_tier() -> None:
    block = {
        "promptTokenCount": 1000,
        "candidatesTokenCount": 100,
        "serviceTier": "FLEX",
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 200},
            {"modality": "AUDIO", "tokenCount": 800},
        ],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 60}, "junk"],
    }
    parser = parse(GEMINI, "generate_content", _gemini_usage(block))
    assert parser.usage == Usage(
        input_tokens=1000,
        output_tokens=100,
        extras=Extras(service_tier="flex", input_audio_tokens=800, output_image_tokens=60),
    )
    many = {**block, "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 1}] * 10_000}
    parser = parse(GEMINI, "generate_content", _gemini_usage(many))
    assert parser.usage is not None and parser.usage.extras is not None
    assert parser.usage.extras.input_audio_tokens == 16  # only MAX_MODALITIES entries read


@pytest.mark.parametrize(
    ("tier", "read"), [("priority", "priority"), ("FLEX", "flex"), (7, None), ("a b", None)]
)
def test_the_requested_service_tier_is_read_for_the_reservation(
    tier: object, read: str | None
) -> None:
    assert chat({"model": "gpt-5", "service_tier": tier}).service_tier == read
    assert chat({"model": "gpt-5"}).service_tier is None
