"""Percent-encoded paths through the running proxy (docs/reference.md §1, "Path forms"):
another spelling of a metered endpoint is metered as that endpoint and reaches the
upstream in the canonical form; a spelling spendgate refuses never reaches it."""

from __future__ import annotations

from typing import Any

import pytest
from yarl import URL

from tests.conftest import Proxy
from tests.helpers.recordings import CASES, spendgate_usage
from tests.paths import FIXTURES
from tests.upstream import FakeUpstream, fixture_reply


def raw_url(proxy: Proxy, path: str) -> URL:
    """The path exactly as written: a plain ``str`` URL would be normalized by yarl."""
    return URL(proxy.url("").rstrip("/") + path, encoded=True)


def recorded(recording: str) -> tuple[bytes, tuple[int | None, int | None]]:
    """A recording's request body, and the input and output tokens it must be billed."""
    (case,) = [c for c in CASES if c.name == recording]
    usage = spendgate_usage(case)
    assert usage is not None
    counts = usage.counts()
    body = (FIXTURES / case.entry["request_file"]).read_bytes()
    return body, (counts.input_tokens, counts.output_tokens)


@pytest.mark.parametrize(
    ("path", "recording", "canonical", "endpoint"),
    [
        ("/v1/chat/completion%73", "openai/chat_json_cached_gpt-4o-mini.json",
         "/v1/chat/completions", "chat"),
        ("/ollama/api/cha%74", "ollama/chat_stream_llama3.ndjson", "/api/chat", "ollama_chat"),
        ("/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent",
         "gemini/generate_content_thinking_gemini-2.5-flash.json",
         "/v1beta/models/gemini-2.5-flash:generateContent", "generate_content"),
    ],
)  # fmt: skip
async def test_encoded_spelling_is_metered(
    proxy: Proxy,
    upstream: FakeUpstream,
    path: str,
    recording: str,
    canonical: str,
    endpoint: str,
) -> None:
    body, tokens = recorded(recording)
    upstream.queue(fixture_reply(recording))
    async with proxy.http.post(
        raw_url(proxy, path),
        data=body,
        headers={"Content-Type": "application/json", "X-Spendgate-Session": "enc"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    assert [s.path for s in upstream.seen] == [canonical]
    (row,) = await proxy.messages("enc")
    assert row["endpoint"] == endpoint
    assert (row["inputTokens"], row["outputTokens"]) == tokens
    assert row["costUsd"] is not None
    assert (await proxy.cost("enc"))["totalInputTokens"] == row["inputTokens"]


def error_message(style: str, body: Any) -> str:
    message: str = body["error"] if style == "ollama" else body["error"]["message"]
    return message


@pytest.mark.parametrize(
    ("path", "style", "why"),
    [
        ("/v1/chat/completions%2F", "openai", "an encoded '/'"),
        ("/openai/v1/..%2fchat/completions", "openai", "an encoded '/'"),
        ("/v1/chat%5ccompletions", "openai", "an encoded '\\'"),
        ("/v1/chat\\completions", "openai", "a '\\'"),
        ("/v1/chat/completions%00", "openai", "an encoded control character"),
        ("/v1/chat/completions%1f", "openai", "an encoded control character"),
        ("/v1/chat/completions%7F", "openai", "an encoded control character"),
        ("/v1/chat/completions%zz", "openai", "'%' not followed by two hex digits"),
        ("/v1/chat/completions%4", "openai", "'%' not followed by two hex digits"),
        ("/v1/x/%2e/chat/completions", "openai", "'.' or '..' segment"),
        ("/v1/x/%2e%2E/chat/completions", "openai", "'.' or '..' segment"),
        ("/v1/x/%2E%2E/chat/completions", "openai", "'.' or '..' segment"),
        ("/v1/x/.%2e/chat/completions", "openai", "'.' or '..' segment"),
        ("/v1/x/%2e./chat/completions", "openai", "'.' or '..' segment"),
        ("/v1/x/../chat/completions", "openai", "'.' or '..' segment"),
        ("/s/run-1/anthropic/v1/%2e%2e/v1/messages", "anthropic", "'.' or '..' segment"),
        ("/ollama/api/x/.%2E/chat", "ollama", "'.' or '..' segment"),
        ("/gemini/v1beta/models/%2e%2e%2Fgemini-2.5-flash:generateContent", "gemini",
         "an encoded '/'"),
    ],
)  # fmt: skip
async def test_refused_spelling_never_reaches_the_upstream(
    proxy: Proxy, upstream: FakeUpstream, path: str, style: str, why: str
) -> None:
    async with proxy.http.post(
        raw_url(proxy, path), data=b"{}", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        message = error_message(style, await resp.json())
    assert message.startswith(f"path {path!r} contains ") and why in message
    assert upstream.seen == []


async def test_encoded_newline_never_reaches_the_upstream(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # aiohttp answers before spendgate does (its catch-all route's ".*" stops at a decoded
    # newline): a 404, not the 400; either way nothing goes upstream
    async with proxy.http.post(raw_url(proxy, "/v1/chat/completions%0d%0a"), data=b"{}") as resp:
        assert resp.status in (400, 404)
    assert upstream.seen == []
