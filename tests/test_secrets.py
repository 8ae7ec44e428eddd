"""Keys never echo (issue #16, item 4; docs/reference.md §1 "API keys").

A request carries keys in every place a client puts them (the query: ``key``,
``api_key``, ``access_token``, ``token``; the headers: ``Authorization``, ``x-api-key``,
``x-goog-api-key``, ``api-key``) and is sent down every failure path: a refused
connection, a reset before the headers, a timeout, malformed upstream HTTP, a JSON body
cut short, a stream broken mid-way, a 413, 400 routing errors, a 402, and a 5xx whose
body echoes the key. Then every place spendgate writes is searched for each key: the
response bodies and headers, the log records at DEBUG, the database files, the events a
subscriber received, ``/metrics``, and the CSV and JSON exports. The real ``spendgate
serve`` process is searched too (its whole output at debug level).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from spendgate.forwarding import REDACTED, redact, request_secrets, secret_name
from spendgate.settings import RouteConfig
from tests.conftest import Proxy, StartProxy, eventually
from tests.events_client import EventsClient
from tests.upstream import FakeUpstream, Reply, fixture_reply

QUERY_KEYS = {
    "key": "AIzaSyQUERY-key-0123456789abcdef",
    "api_key": "qk-API_KEY-0123456789abcdef",
    "access_token": "ya29.ACCESS-TOKEN-0123456789",
    "token": "tok-QUERY-TOKEN-0123456789",
}
HEADER_KEYS = {
    "Authorization": "Bearer sk-proj-AUTHORIZATION-0123456789",
    "x-api-key": "sk-ant-X-API-KEY-0123456789",
    "x-goog-api-key": "AIzaSyX-GOOG-API-KEY-012345",
    "api-key": "azure-API-KEY-HEADER-0123456789",
}
SECRETS = [*QUERY_KEYS.values(), *HEADER_KEYS.values(), "sk-proj-AUTHORIZATION-0123456789"]
QUERY = "alt=sse&" + "&".join(f"{k}={quote(v, safe='')}" for k, v in QUERY_KEYS.items())
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

MALFORMED = (
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",  # a bad header value
    b"garbage that is no status line\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nzz\r\n",  # a bad chunk size
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leaks(data: bytes | str, secrets: Iterable[str] = SECRETS) -> list[str]:
    """The secrets found in ``data``, as sent or percent-encoded."""
    raw = data.encode() if isinstance(data, str) else data
    return [s for s in secrets if s.encode() in raw or quote(s, safe="").encode() in raw]


async def malformed_upstream() -> AsyncIterator[str]:
    """A raw TCP server on a loopback port that answers each request with broken HTTP."""
    replies = iter(MALFORMED * 10)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(next(replies))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def garbage() -> AsyncIterator[str]:
    async for url in malformed_upstream():
        yield url


@pytest.fixture
async def keyed_proxy(start_proxy: StartProxy, garbage: str) -> Proxy:
    return await start_proxy(
        upstream_idle_timeout_s=0.3,
        max_request_bytes=4096,
        routes=[
            RouteConfig(
                prefix="/dead", upstream=f"http://127.0.0.1:{free_port()}", adapter="gemini"
            ),
            RouteConfig(prefix="/garbage", upstream=garbage, adapter="gemini"),
        ],
    )


async def send(proxy: Proxy, path: str, body: Any = BODY, **kw: Any) -> tuple[int, bytes, str]:
    """A POST carrying every key: (status, body, headers as text)."""
    url = proxy.url(path + ("&" if "?" in path else "?") + QUERY)
    async with proxy.http.post(url, json=body, headers=HEADER_KEYS, **kw) as r:
        return r.status, await r.read(), str(r.headers)


async def test_no_failure_path_echoes_a_key(
    keyed_proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = keyed_proxy
    echo = b'{"error": {"code": 400, "message": "API key ' + SECRETS[0].encode() + b' not valid"}}'
    upstream.queue(
        fixture_reply("gemini/generate_content_cached_gemini-2.5-flash.json"),  # ok: a 200
        Reply(drop=True),  # reset before the headers
        Reply(hang=2.0, chunks=[b"{}"]),  # no answer in time
        Reply(status=500, chunks=[echo]),  # the upstream echoes the key back
        Reply(  # a whole-read body cut short
            chunks=[b'{"candidates": [', b"]}"],
            headers={"Content-Length": "400"},
            reset_after=1,
        ),
        Reply(  # a stream broken mid-way
            chunks=[b'data: {"candidates": []}\r\n\r\n'] * 4,
            content_type="text/event-stream",
            reset_after=2,
        ),
        Reply(  # a stream gone silent mid-way
            chunks=[b'data: {"candidates": []}\r\n\r\n'] * 4,
            content_type="text/event-stream",
            stall_after=2,
            hang=2.0,
        ),
    )
    async with EventsClient(proxy.http, proxy.url("/api/events")) as events:
        seen: dict[str, tuple[int, bytes, str]] = {
            "ok": await send(proxy, f"/s/ok/gemini{GEMINI}"),
            "reset": await send(proxy, f"/s/reset/gemini{GEMINI}"),
            "timeout": await send(proxy, f"/s/timeout/gemini{GEMINI}"),
            "echo": await send(proxy, f"/s/echo/gemini{GEMINI}"),
            "cut short": await send(proxy, f"/s/short/gemini{GEMINI}"),
            "broken stream": await send(
                proxy, f"/s/broken/gemini{GEMINI.replace('generate', 'streamGenerate')}"
            ),
            "silent stream": await send(
                proxy, f"/s/silent/gemini{GEMINI.replace('generate', 'streamGenerate')}"
            ),
            "refused": await send(proxy, f"/s/refused/dead{GEMINI}"),
            "too large": await send(proxy, f"/s/big/gemini{GEMINI}", body={"x": "y" * 8000}),
            "no route": await send(proxy, f"/nowhere{GEMINI}"),
            "bad session": await send(proxy, f"/s/bad%20id/gemini{GEMINI}"),
            "bad spelling": await send(proxy, f"/s/x/gemini/v1beta/models/a%2F..%2Fb{GEMINI}"),
        }
        for i in range(len(MALFORMED)):
            seen[f"malformed {i}"] = await send(proxy, f"/s/malformed/garbage{GEMINI}")
        async with proxy.http.put(
            proxy.url("/api/sessions/broke/budget"), json={"budgetUsd": 0}
        ) as r:
            assert r.status == 200
        seen["402"] = await send(proxy, f"/s/broke/gemini{GEMINI}")

        statuses = {path: status for path, (status, _, _) in seen.items()}
        assert statuses == {
            "ok": 200, "reset": 502, "timeout": 504, "echo": 500, "cut short": 502,
            "broken stream": 200, "silent stream": 200, "refused": 502, "too large": 413,
            "no route": 400, "bad session": 400, "bad spelling": 400,
            **{f"malformed {i}": 502 for i in range(len(MALFORMED))}, "402": 402,
        }  # fmt: skip
        # the failures are spendgate's own texts, with the keys taken out
        assert b"key=[redacted]" in seen["malformed 0"][1]
        assert b"broke mid-response" in seen["broken stream"][1]
        # an upstream's own body is forwarded unchanged, its echo of the key included
        assert seen["echo"][1] == echo
        for path, (_, body, headers) in seen.items():
            if path != "echo":
                assert not leaks(body), (path, body)
            assert not leaks(headers), (path, headers)

        await proxy.store.flush()
        sessions = ["ok", "reset", "timeout", "echo", "short", "broken", "silent", "refused"]
        sessions += ["malformed", "broke"]

        async def all_final() -> bool:
            finals = [e for e in events.events if e.type == "token.usage" and e.data["final"]]
            return len(finals) >= len(seen) - 5  # every forwarded request, and the 402 none

        await eventually(all_final)
    assert events.events
    for ev in events.events:
        assert not leaks(orjson.dumps(ev.data)), ev
    history = proxy.bus._history  # type: ignore[attr-defined]
    assert all(not leaks(e.encoded()) for e in history)

    async with proxy.http.get(proxy.url("/metrics")) as r:
        assert not leaks(await r.read())
    for sid in sessions:
        for fmt in ("csv", "json"):
            async with proxy.http.get(proxy.url(f"/api/sessions/{sid}/export?format={fmt}")) as r:
                assert r.status == 200, sid
                assert not leaks(await r.read()), (sid, fmt)
        async with proxy.http.get(proxy.url(f"/api/sessions/{sid}/messages")) as r:
            assert not leaks(await r.read()), sid
    rows = [m for sid in sessions for m in await proxy.messages(sid)]
    errors = {r["error"] for r in rows}
    assert {"reset", "timeout", "connect", "upstream_reset", "upstream_timeout"} <= errors
    db = proxy.settings.db_path
    files = list(db.parent.glob(db.name + "*"))
    assert files
    for f in files:
        assert not leaks(f.read_bytes()), f

    # aiohttp's access log belongs to the test server (its request line carries the
    # query); `spendgate serve` runs without one (test below)
    records = [r for r in caplog.records if r.name != "aiohttp.access"]
    text = "\n".join(logging.Formatter().format(r) for r in records)
    assert "upstream reset for garbage" in text and REDACTED in text
    assert not leaks(text), [line for line in text.splitlines() if leaks(line)]


async def test_spendgate_serve_writes_no_key_at_debug(tmp_path: Path, garbage: str) -> None:
    """The real process: its whole output (logs at debug level; no access log)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")},
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp_path / "serve.db"),
        "SPENDGATE_GEMINI_BASE_URL": garbage,
        "SPENDGATE_OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}",  # refused
        "SPENDGATE_LOG_LEVEL": "debug",
    }
    out = tmp_path / "serve.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendgate", "serve"], env=env, stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            bodies = []
            for path in (f"/s/p/gemini{GEMINI}", "/s/p/openai/v1/chat/completions"):
                url = f"{base}{path}?{QUERY}"
                async with http.post(url, json=BODY, headers=HEADER_KEYS) as r:
                    assert r.status == 502
                    bodies.append(await r.read())
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
    for body in bodies:
        assert not leaks(body), body
    output = out.read_bytes()
    assert b"upstream reset for gemini" in output and b"upstream connect for openai" in output
    assert b"POST /s/p/" not in output  # no access log line
    assert not leaks(output), output.decode(errors="replace")
    assert not leaks((tmp_path / "serve.db").read_bytes())


# -- the redaction itself --------------------------------------------------------------


def test_redact_takes_keys_out_of_urls_headers_and_known_values() -> None:
    text = (
        "400, message='Invalid', url='http://u:hunter2@127.0.0.1:9/v1beta/m:gen?alt=sse"
        "&key=AIzaK1&API_KEY=k2&access_token=k3&pageToken=k4&ke%79=k5&client_secret=k6"
        "&limit=2#frag' {'x-api-key': 'k7', 'Authorization': 'Bearer k8'} x-goog-api-key: k9"
    )
    out = redact(text)
    for secret in ("hunter2", "AIzaK1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"):
        assert secret not in out, secret
    assert "alt=sse" in out and "limit=2#frag" in out and "127.0.0.1:9/v1beta/m:gen" in out
    assert "http://[redacted]@127.0.0.1" in out and "Bearer [redacted]" in out
    assert redact(out) == out  # idempotent
    assert redact("") == "" and redact("no secrets here: gpt-4o") == "no secrets here: gpt-4o"


def test_known_values_are_replaced_anywhere_as_sent_or_percent_encoded() -> None:
    secrets = request_secrets(
        {"Authorization": "Bearer sk-LONG/secret+value", "Content-Type": "application/json"},
        {"key": "AIza-from-the-query", "alt": "sse"},
        {"X-Portkey-Api-Key": "pk-held-by-the-proxy"},
    )
    assert "application/json" not in secrets and "sse" not in secrets
    text = (
        "echo sk-LONG/secret+value and sk-LONG%2Fsecret%2Bvalue, "
        "AIza-from-the-query; pk-held-by-the-proxy"
    )
    out = redact(text, secrets)
    assert out == f"echo {REDACTED} and {REDACTED}, {REDACTED}; {REDACTED}"
    # a short value is only taken out where a pattern finds it
    assert redact("k and ?key=k", ["k"]) == f"k and ?key={REDACTED}"


@pytest.mark.parametrize(
    "name",
    ["Authorization", "x-api-key", "X-Goog-Api-Key", "api-key", "api_key", "apikey", "key",
     "access_token", "token", "refresh_token", "client_secret", "password", "sig",
     "X-Amz-Signature", "Cookie", "Proxy-Authorization", "x-portkey-api-key"],
)  # fmt: skip
def test_secret_names(name: str) -> None:
    assert secret_name(name)


@pytest.mark.parametrize("name", ["alt", "model", "Content-Type", "limit", "after", "session"])
def test_names_that_are_not_secret(name: str) -> None:
    assert not secret_name(name)
