"""Every recording in the manifest, replayed through the running proxy to a real client.

Adding a recording to ``MANIFEST.json`` adds a case here: the client must receive the
exact recorded bytes, and the stored row must carry the exact mapped numbers (or an
estimate, flagged, where the provider reported none).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from spendgate.settings import RouteConfig
from tests.conftest import StartProxy
from tests.helpers.recordings import CASES, Case, spendgate_usage
from tests.paths import FIXTURES
from tests.upstream import FakeUpstream, Reply

PREFIX = {
    "openai": "/openai",
    "azure": "/azure",
    "anthropic": "/anthropic",
    "gemini": "/gemini",
    "vertexai": "/vertex",
    "ollama": "/ollama",
}


def route_prefix(case: Case) -> str:
    if case.name.startswith("openai_compatible/"):
        return "/openrouter"
    return PREFIX[case.entry["api"].split(".", 1)[0]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_recording_through_proxy(
    case: Case, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    base = upstream.base_url  # type: ignore[attr-defined]
    proxy = await start_proxy(
        routes=[
            RouteConfig(prefix="/azure", upstream=base, adapter="azure", provider="azure"),
            RouteConfig(prefix="/vertex", upstream=base, adapter="gemini", provider="vertex_ai"),
            RouteConfig(
                prefix="/openrouter", upstream=base, adapter="openai", provider="openrouter"
            ),
        ]
    )
    entry = case.entry
    data = case.data
    upstream.queue(
        Reply(
            chunks=[data[i : i + 97] for i in range(0, len(data), 97)],
            content_type=entry["content_type"] or "application/octet-stream",
        )
    )
    url = urlsplit(entry["request_url"])
    path = f"/s/replay{route_prefix(case)}{url.path}" + (f"?{url.query}" if url.query else "")
    body = (FIXTURES / entry["request_file"]).read_bytes()
    async with proxy.http.request(
        entry["request_method"], proxy.url(path), data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:  # fmt: skip
        assert resp.status == 200
        received = await resp.read()
    assert upstream.seen[0].path == url.path
    (row,) = await proxy.messages("replay")
    expected = spendgate_usage(case)
    if expected is None:
        assert row["estimated"] is True, row
        if case.info.stream and entry["api"].startswith("openai.chat"):
            # the proxy asked for usage; the recording has none, so nothing was hidden
            assert received == data
        return
    assert received == data  # byte for byte
    counts = expected.counts()
    got = (row["inputTokens"], row["outputTokens"], row["cachedInputTokens"],
           row["cacheWriteTokens"], row["reasoningTokens"])  # fmt: skip
    want = (counts.input_tokens, counts.output_tokens, counts.cached_input_tokens,
            counts.cache_write_tokens, counts.reasoning_tokens)  # fmt: skip
    assert got == want
    assert row["estimated"] is False
    assert row["modelId"] == (entry["response_model"] or entry["model"])
