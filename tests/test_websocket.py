"""WebSocket through the real proxy to a fake WebSocket upstream (docs/reference.md §1
"WebSocket"): the handshake, every frame kind both ways, closes, refusals, limits, and
the Responses API metered per ``response.create`` (Codex's WebSocket mode)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import Proxy, StartProxy, eventually
from tests.events_client import EventsClient

MODEL = "gpt-4o"
KEY = "sk-test-websocket-secret"
BETA = "responses_websockets=2026-02-06"
USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 40},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 120,
}
# gpt-4o: $2.50/M input, $1.25/M cached input, $10/M output:
# 60 × 2.5 + 40 × 1.25 + 20 × 10 = 150 + 50 + 200 = 400 µ$
COST = Decimal("0.0004")


def response_events(
    rid: str, parts: list[str], usage: dict[str, Any] | None = USAGE, end: str = "completed"
) -> list[dict[str, Any]]:
    """A Responses API stream: created, text deltas, and a terminal event with usage."""
    head = {"id": rid, "object": "response", "status": "in_progress", "model": MODEL}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": {**head, "usage": None}}
    ]
    for i, text in enumerate(parts, 1):
        events.append(
            {
                "type": "response.output_text.delta",
                "sequence_number": i,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": text,
            }
        )
    final = {**head, "status": end, "usage": usage}
    events.append({"type": f"response.{end}", "sequence_number": len(events), "response": final})
    return events


@dataclass
class Script:
    """What the fake upstream does for one ``response.create``."""

    events: list[dict[str, Any]]
    delay: float = 0.0
    """Pause before each event."""
    hang_after: int | None = None
    """Go silent (for good) after this many events."""


@dataclass
class FakeSocketUpstream:
    """An aiohttp WebSocket server on a loopback port. It records each handshake and every
    message it receives; it answers a ``response.create`` with the next :class:`Script`,
    echoes other text and binary messages, answers pings with pongs by hand (its autoping
    is off, so the ping is seen), closes when told to (``{"type": "close-me"}``) and echoes
    the client's close code."""

    scripts: list[Script] = field(default_factory=list)
    refuse: Callable[[], web.Response] | None = None
    """Answer each handshake with this instead (a fresh response each time)."""
    protocols: tuple[str, ...] = ("codex.v1", "other.v2")
    handshakes: list[CIMultiDict[str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    received: list[tuple[WSMsgType, Any, Any]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(CIMultiDict(request.headers))
        self.paths.append(request.rel_url.raw_path_qs)
        if self.refuse is not None:
            return self.refuse()
        ws = web.WebSocketResponse(protocols=self.protocols, autoping=False, autoclose=False)
        ws.headers["x-codex-turn-state"] = "turn-7"
        await ws.prepare(request)
        try:
            await self._serve(ws)
        finally:
            self.ended.set()
        return ws

    async def _serve(self, ws: web.WebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            self.received.append((msg.type, msg.data, msg.extra))
            if msg.type is WSMsgType.TEXT:
                obj = orjson.loads(msg.data)
                if obj.get("type") == "response.create":
                    await self._stream(ws, self.scripts.pop(0))
                elif obj.get("type") == "close-me":
                    await ws.close(code=obj["code"], message=obj["reason"].encode())
                    return
                else:
                    await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                await ws.close(code=msg.data, message=b"echo")
                return
            else:
                return

    async def _stream(self, ws: web.WebSocketResponse, script: Script) -> None:
        for i, event in enumerate(script.events):
            if script.hang_after is not None and i >= script.hang_after:
                await asyncio.sleep(3600)
            if script.delay:
                await asyncio.sleep(script.delay)
            await ws.send_str(orjson.dumps(event).decode())


@pytest.fixture
async def fake() -> AsyncIterator[FakeSocketUpstream]:
    up = FakeSocketUpstream()
    server = TestServer(up.app(), host="127.0.0.1", port=0)
    await server.start_server()
    up.base_url = str(server.make_url("")).rstrip("/")
    yield up
    await server.close()


@pytest.fixture
async def ws_proxy(start_proxy: StartProxy, fake: FakeSocketUpstream) -> Proxy:
    return await start_proxy(openai_base_url=fake.base_url)


def ws_url(proxy: Proxy, path: str = "/s/ws-1/openai/v1/responses") -> str:
    return proxy.url(path)


HEADERS = {"Authorization": f"Bearer {KEY}", "openai-beta": BETA}
HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
"""A handshake sent as a plain request, to read a refusal's body."""


def connect(
    proxy: Proxy, path: str = "/s/ws-1/openai/v1/responses", **kw: Any
) -> Any:  # the ws_connect context manager
    kw.setdefault("headers", HEADERS)
    return proxy.http.ws_connect(ws_url(proxy, path), **kw)


def create(**body: Any) -> str:
    return orjson.dumps({"type": "response.create", "model": MODEL, "input": "hi", **body}).decode()


async def receive_response(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Events up to and including the terminal one (or an error)."""
    events = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.TEXT, msg
        event = orjson.loads(msg.data)
        events.append(event)
        if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
            return events
        if event["type"] == "error":
            return events


async def rows(proxy: Proxy, session: str, n: int) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await proxy.messages(session)) >= n

    await eventually(enough)
    found = await proxy.messages(session)
    assert len(found) == n, found
    return found


# -- the relay -------------------------------------------------------------------------------


async def test_handshake_carries_the_clients_headers_and_subprotocols(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    headers = {**HEADERS, "session-id": "codex-thread", "X-Spendgate-Agent": "main"}
    async with connect(
        ws_proxy, "/v1/responses?trace=1", headers=headers, protocols=("nope", "other.v2")
    ) as ws:
        assert ws.protocol == "other.v2"  # the upstream's choice, from the client's list
        assert ws._response.headers["x-codex-turn-state"] == "turn-7"
        await ws.send_str('{"type":"ping-me"}')
        assert (await ws.receive()).data == '{"type":"ping-me"}'
    (seen,) = fake.handshakes
    assert fake.paths == ["/v1/responses?trace=1"]
    assert seen["Authorization"] == f"Bearer {KEY}"
    assert seen["openai-beta"] == BETA
    assert seen["session-id"] == "codex-thread"
    assert seen["Sec-WebSocket-Protocol"] == "nope,other.v2"
    assert seen["Upgrade"] == "websocket" and seen["Sec-WebSocket-Version"] == "13"
    assert "X-Spendgate-Agent" not in seen


async def test_frames_arrive_unchanged_both_ways(ws_proxy: Proxy, fake: FakeSocketUpstream) -> None:
    text = '{"type":"note","text":"héllo ✓ \\u0000 \U0001f600"}'
    blob = bytes(range(256)) * 40
    async with connect(ws_proxy, autoping=False) as ws:
        await ws.send_str(text)
        back = await ws.receive()
        assert (back.type, back.data) == (WSMsgType.TEXT, text)
        await ws.send_bytes(blob)
        back = await ws.receive()
        assert (back.type, back.data) == (WSMsgType.BINARY, blob)
        await ws.ping(b"are-you-there")
        back = await ws.receive()  # the upstream's pong, relayed
        assert (back.type, back.data) == (WSMsgType.PONG, b"are-you-there")
        await ws.close(code=4000, message=b"done for today")
        assert ws.close_code == 4000  # the upstream echoed it
    await asyncio.wait_for(fake.ended.wait(), 5)
    kinds = [(t, d) for t, d, _ in fake.received]
    assert (WSMsgType.TEXT, text) in kinds and (WSMsgType.BINARY, blob) in kinds
    assert (WSMsgType.PING, b"are-you-there") in kinds
    assert fake.received[-1] == (WSMsgType.CLOSE, 4000, "done for today")


async def test_the_upstreams_close_code_and_reason_reach_the_client(ws_proxy: Proxy) -> None:
    async with connect(ws_proxy) as ws:
        await ws.send_str('{"type":"close-me","code":4001,"reason":"turn limit"}')
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4001, "turn limit")


async def test_a_refused_handshake_reaches_the_client_with_status_and_body(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    body = {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
    fake.refuse = lambda: web.json_response(body, status=401, headers={"x-request-id": "req-1"})
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with connect(ws_proxy):
            pass
    assert caught.value.status == 401
    # The same handshake read as plain HTTP: the upstream's body and headers.
    async with ws_proxy.http.get(ws_url(ws_proxy), headers={**HEADERS, **HANDSHAKE}) as resp:
        assert resp.status == 401
        assert await resp.json() == body
        assert resp.headers["x-request-id"] == "req-1"
    async with ws_proxy.http.get(ws_proxy.url("/api/sessions/ws-1/cost")) as r:
        assert r.status == 404  # a handshake is no message, and makes no session


async def test_an_unreachable_upstream_is_a_502_in_the_openai_shape(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(openai_base_url="http://127.0.0.1:9")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with connect(proxy):
            pass
    assert caught.value.status == 502


async def test_a_paused_session_is_refused_at_the_handshake_with_402(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    fake.scripts.append(Script(response_events("resp_1", ["a"])))
    async with connect(ws_proxy) as ws:  # the session exists once it has a message
        await ws.send_str(create())
        await receive_response(ws)
    await rows(ws_proxy, "ws-1", 1)
    async with ws_proxy.http.post(ws_proxy.url("/api/sessions/ws-1/pause")) as r:
        assert r.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with connect(ws_proxy):
            pass
    assert caught.value.status == 402
    assert caught.value.headers is not None
    assert caught.value.headers["x-should-retry"] == "false"
    async with ws_proxy.http.get(ws_url(ws_proxy), headers=HANDSHAKE) as resp:
        error = (await resp.json())["error"]
    assert error["type"] == "budget_exceeded" and error["code"] == "session_budget_exceeded"
    assert len(fake.handshakes) == 1  # the refused ones never reached the upstream


async def test_a_client_message_over_max_request_bytes_closes_with_1009(
    start_proxy: StartProxy, fake: FakeSocketUpstream
) -> None:
    proxy = await start_proxy(openai_base_url=fake.base_url, max_request_bytes=1000)
    async with connect(proxy) as ws:
        await ws.send_str("x" * 2000)
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1009
    await asyncio.wait_for(fake.ended.wait(), 5)
    assert not any(t is WSMsgType.TEXT for t, _, _ in fake.received)


# -- metering the Responses API ----------------------------------------------------------------


async def test_two_sequential_responses_are_two_exact_rows(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    first = response_events("resp_1", ["Hel", "lo"])
    second = response_events("resp_2", ["again"], usage={**USAGE, "output_tokens": 30})
    fake.scripts += [Script(first), Script(second)]
    url = ws_proxy.url("/api/events?session=ws-1")
    async with EventsClient(ws_proxy.http, url) as events, connect(ws_proxy) as ws:
        await ws.send_str(create(max_output_tokens=500))
        got = await receive_response(ws)
        assert got == first  # every event, unchanged
        await ws.send_str(create(previous_response_id="resp_1"))
        assert await receive_response(ws) == second
        await events.wait_for(
            lambda e: e.type == "token.usage" and e.data["final"] and e.data["outputTokens"] == 30
        )
        finals = [e for e in events.events if e.type == "token.usage" and e.data["final"]]
    a, b = await rows(ws_proxy, "ws-1", 2)
    for row, out in ((a, 20), (b, 30)):
        assert row["transport"] == "websocket"
        assert row["endpoint"] == "responses" and row["stream"] is True
        assert row["modelId"] == MODEL and row["status"] == 200
        assert (row["inputTokens"], row["cachedInputTokens"], row["outputTokens"]) == (100, 40, out)
        assert row["reasoningTokens"] == 5
        assert row["estimated"] is False and row["aborted"] is False and row["error"] is None
        assert row["ttftMs"] is not None
    assert Decimal(repr(a["costUsd"])) == COST
    assert Decimal(repr(b["costUsd"])) == COST + Decimal("0.0001")  # 10 more output tokens
    assert {e.data["transport"] for e in finals} == {"websocket"}
    assert len(finals) == 2
    cost = await ws_proxy.cost("ws-1")
    assert cost["messageCount"] == 2
    async with ws_proxy.http.get(ws_proxy.url("/api/sessions/ws-1/export?format=csv")) as r:
        exported = list(csv.DictReader(io.StringIO(await r.text())))
    assert [r["transport"] for r in exported] == ["websocket", "websocket"]


async def test_live_usage_events_while_a_response_streams(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    fake.scripts.append(Script(response_events("resp_1", ["x" * 400] * 3), delay=0.05))
    url = ws_proxy.url("/api/events?session=ws-1")
    async with EventsClient(ws_proxy.http, url) as events, connect(ws_proxy) as ws:
        await ws.send_str(create())
        await receive_response(ws)
        await events.wait_for(lambda e: e.type == "token.usage" and e.data["final"])
    live = [e.data for e in events.events if e.type == "token.usage" and not e.data["final"]]
    assert live, "no live update while the response streamed"
    assert all(d["transport"] == "websocket" and d["estimated"] for d in live)
    assert max(d["outputTokens"] for d in live) >= 100  # the deltas so far, estimated


async def test_a_budget_refusal_is_an_error_event_and_the_socket_stays_usable(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    async with ws_proxy.http.put(
        ws_proxy.url("/api/sessions/ws-1/budget"), json={"budgetUsd": 0.0003}
    ) as r:
        assert r.status == 200
    fake.scripts += [
        Script(response_events("resp_1", ["a"])),
        Script(response_events("resp_2", ["b"])),
    ]
    async with connect(ws_proxy) as ws:
        await ws.send_str(create(max_output_tokens=10))
        await receive_response(ws)  # $0.0004 of $0.0003: the session is spent and paused
        await rows(ws_proxy, "ws-1", 1)
        await ws.send_str(create(max_output_tokens=10))
        (refused,) = await receive_response(ws)
        assert refused["type"] == "error" and refused["status"] == 402
        assert refused["error"]["type"] == "budget_exceeded"
        assert refused["error"]["code"] == "session_budget_exceeded"
        assert "ws-1" in refused["error"]["message"]
        assert refused["headers"]["x-should-retry"] == "false"
        assert refused["headers"]["X-Spendgate-Session"] == "ws-1"
        # Not forwarded, and the socket still relays:
        await ws.send_str('{"type":"still-there"}')
        assert (await asyncio.wait_for(ws.receive(), 5)).data == '{"type":"still-there"}'
        # With more budget the next response.create goes through on the same socket.
        async with ws_proxy.http.put(
            ws_proxy.url("/api/sessions/ws-1/budget"), json={"budgetUsd": 1.0}
        ) as r:
            assert r.status == 200
        async with ws_proxy.http.post(ws_proxy.url("/api/sessions/ws-1/resume")) as r:
            assert r.status in (200, 409), await r.text()
        await ws.send_str(create(max_output_tokens=10))
        assert (await receive_response(ws))[-1]["type"] == "response.completed"
    creates = [d for t, d, _ in fake.received if t is WSMsgType.TEXT and "response.create" in d]
    assert len(creates) == 2
    assert len(await rows(ws_proxy, "ws-1", 2)) == 2


async def test_a_client_that_closes_mid_response_is_billed_as_an_aborted_partial(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    events = response_events("resp_1", ["y" * 200] * 10)
    fake.scripts.append(Script(events, delay=0.05))
    async with connect(ws_proxy) as ws:
        await ws.send_str(create())
        for _ in range(3):  # created and two deltas
            await asyncio.wait_for(ws.receive(), 5)
        await ws.close()
    (row,) = await rows(ws_proxy, "ws-1", 1)
    assert row["aborted"] is True and row["estimated"] is True
    assert row["transport"] == "websocket" and row["status"] == 200
    assert row["outputTokens"] >= 100  # at least the two deltas the client got (400 chars)
    assert row["costUsd"] is not None and row["costUsd"] > 0


async def test_a_client_that_closes_right_after_completed_is_complete(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    fake.scripts.append(Script(response_events("resp_1", ["done"])))
    async with connect(ws_proxy) as ws:
        await ws.send_str(create())
        await receive_response(ws)
    (row,) = await rows(ws_proxy, "ws-1", 1)
    assert row["aborted"] is False and row["estimated"] is False


async def test_an_idle_upstream_mid_response_is_closed_with_an_error_event(
    start_proxy: StartProxy, fake: FakeSocketUpstream
) -> None:
    proxy = await start_proxy(openai_base_url=fake.base_url, upstream_idle_timeout_s=0.3)
    fake.scripts.append(Script(response_events("resp_1", ["a", "b"]), hang_after=2))
    async with connect(proxy) as ws:
        await ws.send_str(create())
        got = [orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data) for _ in range(3)]
        assert [e["type"] for e in got] == [
            "response.created", "response.output_text.delta", "error"
        ]  # fmt: skip
        assert got[2]["status"] == 504 and got[2]["error"]["code"] == "upstream_timeout"
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1014
    (row,) = await rows(proxy, "ws-1", 1)
    assert row["error"] == "upstream_timeout" and row["estimated"] is True, str(row)


async def test_an_idle_socket_between_responses_stays_open(
    start_proxy: StartProxy, fake: FakeSocketUpstream
) -> None:
    proxy = await start_proxy(openai_base_url=fake.base_url, upstream_idle_timeout_s=0.2)
    fake.scripts.append(Script(response_events("resp_1", ["a"])))
    async with connect(proxy) as ws:
        await asyncio.sleep(0.5)  # nothing owed: not idle
        await ws.send_str(create())
        assert (await receive_response(ws))[-1]["type"] == "response.completed"
    await rows(proxy, "ws-1", 1)


async def test_an_upstream_that_refuses_a_request_mid_socket(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    """A second response.create while one runs: the upstream refuses it with an error
    event (as OpenAI's ``response_already_in_flight``); the running one is billed exactly,
    the refused one is a 400 that costs nothing."""
    refused = {
        "type": "error",
        "status": 400,
        "error": {"type": "invalid_request_error", "code": "response_already_in_flight",
                  "message": "a response is already in flight"},
    }  # fmt: skip
    events = response_events("resp_1", ["slow"] * 4)
    fake.scripts.append(Script([*events[:2], refused, *events[2:]], delay=0.05))
    async with connect(ws_proxy) as ws:
        await ws.send_str(create())
        await asyncio.wait_for(ws.receive(), 5)  # created
        fake.scripts.append(Script([]))  # the fake reads it only after the first stream
        await ws.send_str(create(input="and this too"))
        got = await receive_response(ws)  # up to the relayed error
        assert got[-1] == refused
        assert (await receive_response(ws))[-1]["type"] == "response.completed"
    first, second = await rows(ws_proxy, "ws-1", 2)
    assert (first["status"], first["inputTokens"], first["outputTokens"]) == (400, 0, 0)
    assert first["costUsd"] == 0
    assert (second["status"], second["outputTokens"], second["estimated"]) == (200, 20, False)
    assert Decimal(repr(second["costUsd"])) == COST


async def test_the_upstream_closing_mid_response_is_an_upstream_failure(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    events = response_events("resp_1", ["a", "b"])[:2]
    fake.scripts.append(Script(events))
    async with connect(ws_proxy) as ws:
        await ws.send_str(create())
        await asyncio.wait_for(ws.receive(), 5)
        await asyncio.wait_for(ws.receive(), 5)
        await ws.send_str('{"type":"close-me","code":1011,"reason":"overloaded"}')
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1011, "overloaded")
    (row,) = await rows(ws_proxy, "ws-1", 1)
    assert row["error"] == "upstream_reset" and row["aborted"] is False
    assert row["estimated"] is True


async def test_session_and_agent_come_from_headers_as_on_http(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    fake.scripts.append(Script(response_events("resp_1", ["a"])))
    headers = {**HEADERS, "X-Spendgate-Session": "hdr-1", "X-Spendgate-Agent": "reviewer"}
    async with connect(ws_proxy, "/v1/responses", headers=headers) as ws:
        await ws.send_str(create())
        await receive_response(ws)
    (row,) = await rows(ws_proxy, "hdr-1", 1)
    assert row["agentId"] == "reviewer" and row["transport"] == "websocket"
    assert row["route"] == "openai"


async def test_the_realtime_api_is_relayed_unmetered(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    done = {"type": "response.done", "response": {"usage": {"input_tokens": 5}}}
    async with connect(ws_proxy, "/s/rt-1/openai/v1/realtime?model=gpt-realtime") as ws:
        await ws.send_str(orjson.dumps(done).decode())  # echoed back as if the server sent it
        assert orjson.loads((await ws.receive()).data) == done
    assert fake.paths == ["/v1/realtime?model=gpt-realtime"]
    async with ws_proxy.http.get(ws_proxy.url("/api/sessions/rt-1/messages")) as r:
        assert r.status == 404 or (await r.json())["messages"] == []


async def test_a_get_without_upgrade_takes_the_http_path(
    ws_proxy: Proxy, fake: FakeSocketUpstream
) -> None:
    async with ws_proxy.http.get(ws_url(ws_proxy, "/openai/v1/models")) as resp:
        assert resp.status == 400  # the fake WebSocket server's answer to a plain GET
    (seen,) = fake.handshakes
    assert "Upgrade" not in seen and "Sec-WebSocket-Key" not in seen


async def test_the_openai_sdk_websocket_client(ws_proxy: Proxy, fake: FakeSocketUpstream) -> None:
    pytest.importorskip("websockets")  # openai[realtime]; not a dev dependency yet
    import openai

    fake.scripts.append(Script(response_events("resp_1", ["Hi", " there"])))
    client = openai.AsyncOpenAI(
        base_url=ws_proxy.url("/s/sdk-1/openai/v1"), api_key=KEY, max_retries=0
    )
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": MODEL, "input": "hi"})
        text = ""
        async for event in conn:
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                break
    assert text == "Hi there"
    (row,) = await rows(ws_proxy, "sdk-1", 1)
    assert (row["inputTokens"], row["outputTokens"], row["transport"]) == (100, 20, "websocket")
    assert fake.handshakes[0]["Authorization"] == f"Bearer {KEY}"


async def test_the_budget_cut_ends_a_response_over_budget(
    start_proxy: StartProxy, fake: FakeSocketUpstream
) -> None:
    proxy = await start_proxy(openai_base_url=fake.base_url, on_budget_mid_stream="cut")
    async with proxy.http.put(
        proxy.url("/api/sessions/ws-1/budget"), json={"budgetUsd": 0.0003}
    ) as r:
        assert r.status == 200
    # $0.0003 is 30 output tokens of gpt-4o: the second 200-character delta crosses it.
    fake.scripts.append(Script(response_events("resp_1", ["z" * 200] * 10), delay=0.02))
    async with connect(proxy) as ws:
        await ws.send_str(create())
        got = await receive_response(ws)
        assert [e["type"] for e in got[:2]] == ["response.created", "response.output_text.delta"]
        cut = got[-1]
        assert cut["type"] == "error" and cut["status"] == 402
        assert cut["error"]["code"] == "session_budget_exceeded"
        assert "ran out of budget" in cut["error"]["message"]
        assert len(got) < 12  # not the rest of the stream
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1008
    (row,) = await rows(proxy, "ws-1", 1)
    assert row["error"] == "budget_cut" and row["estimated"] is True
    assert row["transport"] == "websocket"
