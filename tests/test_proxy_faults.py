"""Bad input and broken peers: a clear error, unchanged bytes, and never a lost row."""

from __future__ import annotations

import asyncio
import gzip
import socket
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import Proxy, StartProxy, eventually
from tests.upstream import FakeUpstream, Reply, fixture_reply, sse_reply

MSG: Any = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unknown_route_is_400_in_openai_shape(proxy: Proxy) -> None:
    async with proxy.http.post(proxy.url("/nowhere/v1/chat/completions"), json={}) as r:
        assert r.status == 400
        body = await r.json()
    assert (
        "no route" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    )


async def test_bad_session_id_is_400_and_forwarded_nowhere(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    c = anthropic.AsyncAnthropic(
        base_url=proxy.url("/s/bad%20id/anthropic"), api_key="k", max_retries=0
    )
    async with c:
        with pytest.raises(anthropic.BadRequestError, match="invalid session id"):
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=MSG)
    async with proxy.http.post(
        proxy.url("/openai/v1/chat/completions"), json={}, headers={"X-Spendgate-Session": "a\tb"}
    ) as r:
        assert r.status == 400
    assert upstream.seen == []


async def test_body_over_limit_is_413(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(max_request_bytes=1000)
    c = openai.AsyncOpenAI(base_url=proxy.url("/openai/v1"), api_key="k", max_retries=0)
    async with c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x" * 2000}]
            )
    assert err.value.status_code == 413 and "max_request_bytes" in err.value.message
    assert upstream.seen == []


async def test_dead_upstream_is_502_and_recorded(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(openai_base_url=f"http://127.0.0.1:{free_port()}")
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/dead/openai/v1"), api_key="k", max_retries=0)
    async with c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert err.value.status_code == 502 and "unreachable" in err.value.message
    (row,) = await proxy.messages("dead")
    assert row["status"] == 502 and row["error"] == "connect" and row["costUsd"] == 0


async def test_hanging_upstream_is_504(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(upstream_idle_timeout_s=0.2)
    upstream.queue(Reply(hang=2.0, chunks=[b"{}"]))
    await _expect_504(proxy, "hang", "gpt-4o", "did not answer in time")


async def _expect_504(proxy: Proxy, session: str, model: str, says: str) -> None:
    """A chat request that must end in spendgate's 504 saying ``says``, with a timeout row."""
    async with proxy.http.post(
        proxy.url(f"/s/{session}/openai/v1/chat/completions"), json={"model": model}
    ) as r:
        assert r.status == 504
        assert says in (await r.json())["error"]["message"]
    (row,) = await proxy.messages(session)
    assert row["status"] == 504 and row["error"] == "timeout"


def _words(n: int) -> list[dict[str, Any]]:
    return [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
         "choices": [{"index": 0, "delta": {"content": "four char"}, "finish_reason": None}]}
        for _ in range(n)
    ]  # fmt: skip


async def test_client_hangs_up_mid_stream(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(sse_reply(_words(40), delay=0.02))
    async with proxy.http.post(
        proxy.url("/s/gone/openai/v1/chat/completions"),
        json={"model": "gpt-4o", "messages": MSG, "stream": True},
    ) as r:
        await r.content.readexactly(200)  # read a little, then hang up
    await eventually(lambda: _has_rows(proxy, "gone"))
    (row,) = await proxy.messages("gone")
    assert row["aborted"] is True and row["estimated"] is True
    assert 0 < row["outputTokens"] < 40 * 3
    ledger = proxy.ledger
    assert await ledger.budgeted("gone", None) is None  # no budget, no reservation left behind:
    assert ledger._sessions["gone"].in_flight == 0  # type: ignore[attr-defined]


async def _has_rows(proxy: Proxy, session: str) -> bool:
    if proxy.ledger.session(session) is None:
        return False
    return bool(await proxy.messages(session))


async def test_upstream_reset_mid_stream(proxy: Proxy, upstream: FakeUpstream) -> None:
    reply = sse_reply(_words(20))
    reply.reset_after = 5
    upstream.queue(reply)
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/reset/openai/v1"), api_key="k", max_retries=0)
    async with c:
        stream = await c.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        with pytest.raises(openai.APIError, match="broke mid-response"):
            async for _ in stream:
                pass
    (row,) = await proxy.messages("reset")
    assert row["error"] == "upstream_reset" and row["estimated"] is True
    assert row["outputTokens"] > 0


async def test_garbled_stream_is_forwarded_unchanged(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = (
        b": keep-alive\r\n\r\ndata: {not json\n\ndata: \xff\xfe\n\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"abcdefgh"}}],"model":"gpt-4o"}\n\n'
        b"data: [DONE]\n\n"
    )
    upstream.queue(
        Reply(
            chunks=[body[i : i + 3] for i in range(0, len(body), 3)],
            content_type="text/event-stream",
        )
    )
    async with proxy.http.post(
        proxy.url("/s/garble/openai/v1/chat/completions"),
        json={
            "model": "gpt-4o",
            "messages": MSG,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert await r.read() == body
    (row,) = await proxy.messages("garble")
    assert row["estimated"] is True and row["outputTokens"] == 2 and row["status"] == 200


async def test_gzip_body_forwarded_as_is_and_metered(proxy: Proxy, upstream: FakeUpstream) -> None:
    raw = (tests_fixture := "openai/chat_json_cached_gpt-4o-mini.json") and fixture_reply(
        tests_fixture
    ).chunks
    zipped = gzip.compress(b"".join(raw))
    upstream.queue(Reply(chunks=[zipped[:50], zipped[50:]], headers={"Content-Encoding": "gzip"}))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(
            proxy.url("/s/gz/openai/v1/chat/completions"),
            json={"model": "gpt-4o-mini", "messages": MSG},
            headers={"Accept-Encoding": "gzip"},
        ) as r,
    ):
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == zipped
    assert upstream.seen[0].headers["Accept-Encoding"] == "gzip"
    (row,) = await proxy.messages("gz")
    assert (row["inputTokens"], row["cachedInputTokens"], row["outputTokens"]) == (1149, 1024, 353)


def _with_length(body: bytes, pieces: int = 2, **kw: Any) -> Reply:
    """A JSON reply with a Content-Length (not chunked), sent in ``pieces`` writes."""
    step = -(-len(body) // pieces)
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    headers = {"Content-Length": str(len(body)), **kw.pop("headers", {})}
    return Reply(chunks=chunks, headers=headers, **kw)


async def _raw_chat(proxy: Proxy, session: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """A chat request whose answer is read as raw bytes (nothing decompressed)."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(
            proxy.url(f"/s/{session}/openai/v1/chat/completions"),
            json={"model": "gpt-4o-mini", "messages": MSG},
        ) as r,
    ):
        return r.status, r.headers, await r.read()


@pytest.mark.parametrize("gzipped", [False, True])
async def test_json_of_known_length_is_sent_whole_and_unchanged(
    proxy: Proxy, upstream: FakeUpstream, gzipped: bool
) -> None:
    body = b"".join(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json").chunks)
    sent = gzip.compress(body) if gzipped else body
    headers = {"Content-Encoding": "gzip", "X-Request-Id": "req_1"} if gzipped else {}
    upstream.queue(_with_length(sent, pieces=3, headers={"X-Request-Id": "req_1", **headers}))
    status, got_headers, got = await _raw_chat(proxy, "whole")
    assert status == 200 and got == sent
    assert got_headers.getall("Content-Length") == [str(len(sent))]
    assert got_headers["X-Request-Id"] == "req_1"
    assert got_headers["Content-Type"] == "application/json"
    (row,) = await proxy.messages("whole")
    assert (row["inputTokens"], row["cachedInputTokens"], row["outputTokens"]) == (1149, 1024, 353)
    assert row["estimated"] is False and row["ttftMs"] is not None


async def test_json_that_claims_gzip_but_is_not_passes_unchanged(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    garbled = b"\x1f\x8b not really gzip " + bytes(range(256))
    upstream.queue(_with_length(garbled, headers={"Content-Encoding": "gzip"}))
    assert (await _raw_chat(proxy, "badgz"))[::2] == (200, garbled)
    (row,) = await proxy.messages("badgz")
    assert row["status"] == 200 and row["estimated"] is True and row["outputTokens"] == 0


async def test_json_cut_short_is_a_clean_502(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = b"".join(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json").chunks)
    upstream.queue(_with_length(body, pieces=4, reset_after=2))  # promises more than it sends
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/short/openai/v1"), api_key="k", max_retries=0)
    async with c:
        with pytest.raises(openai.InternalServerError, match="broke off its response") as err:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert err.value.status_code == 502
    (row,) = await proxy.messages("short")
    assert row["status"] == 502 and row["error"] == "reset"
    assert row["costUsd"] == 0 and row["outputTokens"] == 0


async def test_transparency_of_method_path_query_and_headers(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(
        Reply(chunks=[b'{"data": []}'], headers={"X-Request-Id": "req-1", "Set-Cookie": "a=1"})
    )
    async with proxy.http.get(
        proxy.url("/s/t/openai/v1/models/a%2Fb?limit=2&after=x%20y"),
        headers={
            "Authorization": "Bearer sk-x",
            "OpenAI-Organization": "org-1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
        },
    ) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == "req-1"
        assert await r.read() == b'{"data": []}'
    seen = upstream.seen[0]
    assert seen.method == "GET" and seen.query == "limit=2&after=x%20y"
    assert seen.path == "/v1/models/a%2Fb"
    assert seen.headers["OpenAI-Organization"] == "org-1" and "X-Hop" not in seen.headers
    # A model listing costs nothing: no message, no session (docs/reference.md §5).
    assert proxy.ledger.session("t") is None
    async with proxy.http.get(proxy.url("/api/sessions/t/messages")) as r:
        assert r.status == 404
    metrics = await (await proxy.http.get(proxy.url("/metrics"))).text()
    labels = 'model="unknown",provider="openai",route="openai",status="200"'
    assert f"spendgate_requests_total{{{labels}}} 1.0" in metrics


async def test_api_keys_never_stored_or_emitted(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    secret = "sk-proj-SECRET-DO-NOT-STORE-123"
    upstream.queue(fixture_reply("openai/chat_json_gpt-3.5-turbo.json"))
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/keys/openai/v1"), api_key=secret, max_retries=0)
    async with c:
        await c.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
    await proxy.store.flush()
    db = proxy.settings.db_path
    for f in db.parent.glob(db.name + "*"):
        assert secret.encode() not in f.read_bytes()
    async with proxy.http.get(proxy.url("/metrics")) as r:
        assert secret not in await r.text()
    export = await proxy.get_json("/api/sessions/keys/export?format=json")
    assert secret not in str(export) and secret not in caplog.text
    history = proxy.bus._history  # type: ignore[attr-defined]
    assert history and all(secret.encode() not in e.encoded() for e in history)
    import hashlib

    assert (
        (await proxy.store.latest_message("keys")).key_fingerprint
        == hashlib.sha256(  # type: ignore[union-attr]
            secret.encode()
        ).hexdigest()[:12]
    )


async def test_malformed_request_body_is_forwarded_as_is(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(fixture_reply("openai/chat_json_gpt-3.5-turbo.json"))
    async with proxy.http.post(
        proxy.url("/s/mal/openai/v1/chat/completions"),
        data=b'{"model": "gpt-4o", oops',
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 200
    assert upstream.seen[0].body == b'{"model": "gpt-4o", oops'
    (row,) = await proxy.messages("mal")
    assert row["inputTokens"] == 15  # the provider's numbers still count


async def test_shutdown_flushes_every_finished_row(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    proxy = await start_proxy(flush_interval_ms=60_000)  # only the shutdown flush can write them
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/flush/openai/v1"), api_key="k", max_retries=0)
    async with c:
        await asyncio.gather(
            *(c.chat.completions.create(model="gpt-3.5-turbo", messages=MSG) for _ in range(50))
        )
    await proxy.server.close()
    again = await start_proxy()
    cost = await again.cost("flush")
    assert cost["messageCount"] == 50 and cost["totalInputTokens"] == 50 * 15


async def test_upstream_stalls_mid_stream(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    """The idle timeout (not a total one) ends a stream whose upstream went silent."""
    proxy = await start_proxy(upstream_idle_timeout_s=0.3)
    reply = sse_reply(_words(10))
    reply.stall_after, reply.hang = 4, 5.0
    upstream.queue(reply)
    client = openai.AsyncOpenAI(
        base_url=proxy.url("/s/stall/openai/v1"), api_key="k", max_retries=0
    )
    async with client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        got = 0
        with pytest.raises(openai.APIError, match="broke mid-response"):
            async for _ in stream:
                got += 1
    assert got == 4
    (row,) = await proxy.messages("stall")
    assert row["error"] == "upstream_timeout" and row["estimated"] is True


async def test_a_slow_stream_that_keeps_sending_is_not_cut(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Silence is measured between pieces: 1.2 s of stream with 0.15 s gaps outlives a
    0.3 s idle timeout."""
    proxy = await start_proxy(upstream_idle_timeout_s=0.3)
    upstream.queue(sse_reply(_words(8), delay=0.15))
    client = openai.AsyncOpenAI(base_url=proxy.url("/s/slow/openai/v1"), api_key="k", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        assert len([chunk async for chunk in stream]) == 8
    (row,) = await proxy.messages("slow")
    assert row["error"] is None and row["status"] == 200


async def test_json_that_stalls_mid_body_is_504(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(upstream_idle_timeout_s=0.3)
    body = b"".join(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json").chunks)
    upstream.queue(_with_length(body, pieces=4, stall_after=2, hang=5.0))
    await _expect_504(proxy, "stuck", "gpt-4o-mini", "went silent for 0.3 s")


async def test_reset_before_headers_is_502_reset(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(Reply(drop=True))
    async with proxy.http.post(proxy.url("/s/drop/openai/v1/chat/completions"), json={}) as r:
        assert r.status == 502
        assert "closed the connection" in (await r.json())["error"]["message"]
    (row,) = await proxy.messages("drop")
    assert row["error"] == "reset" and row["status"] == 502


async def test_client_that_gives_up_before_an_answer_is_aborted(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(upstream_idle_timeout_s=0.5)
    upstream.queue(Reply(hang=2.0, chunks=[b"{}"]))
    with pytest.raises(TimeoutError):
        async with proxy.http.post(
            proxy.url("/s/impatient/openai/v1/chat/completions"),
            json={"model": "gpt-4o"},
            timeout=aiohttp.ClientTimeout(total=0.1),
        ) as r:
            await r.read()
    await eventually(lambda: _has_rows(proxy, "impatient"))
    (row,) = await proxy.messages("impatient")
    # 504 if the proxy noticed at the timeout, 499 if aiohttp cancelled the handler first
    assert row["status"] in (499, 504) and row["aborted"] is True
    assert row["costUsd"] == 0


async def test_a_subscriber_that_left_is_forgotten_without_an_event(proxy: Proxy) -> None:
    async with proxy.http.get(proxy.url("/api/events?session=quiet")) as r:
        await r.content.readline()
        assert proxy.bus.subscriber_count == 1

    async def gone() -> bool:
        return proxy.bus.subscriber_count == 0

    await eventually(gone, timeout=5)  # within the 1 s poll, not the 15 s keep-alive


def test_upstream_headers_drop_hop_by_hop_and_let_the_route_replace() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from spendgate.forwarding import client_headers, upstream_headers

    sent = CIMultiDict(
        [
            ("Host", "127.0.0.1:8787"), ("Authorization", "Bearer client-key"),
            ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("X-Keep", "a"),
            ("X-Keep", "b"), ("x-spendgate-session", "s1"), ("Accept-Encoding", "gzip"),
            ("Content-Length", "12"),
        ]
    )  # fmt: skip
    out = upstream_headers(
        CIMultiDictProxy(sent), True, (("authorization", "Bearer held-by-proxy"),)
    )
    assert out == [
        ("X-Keep", "a"),
        ("X-Keep", "b"),
        ("authorization", "Bearer held-by-proxy"),
        ("Accept-Encoding", "identity"),
    ]
    back = CIMultiDict([("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("X-A", "1")])
    assert client_headers(CIMultiDictProxy(back), keep_length=True) == [
        ("Content-Length", "5"),
        ("X-A", "1"),
    ]
    assert client_headers(CIMultiDictProxy(back), keep_length=False) == [("X-A", "1")]
