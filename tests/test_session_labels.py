"""Session labels end to end (docs/reference.md §2, §8): the ``X-Spendgate-Session-Label``
header through the proxy (raw bytes too), ``PUT /api/sessions/{id}/label``, ``spendgate
label``, the ``session.label`` event, and the label in the lists, reports and budget
events; ``routing.clean_label`` on its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from spendgate.cli import main
from spendgate.routing import MAX_LABEL, clean_label
from tests.conftest import Proxy, StartProxy
from tests.events_client import EventsClient
from tests.helpers.traffic import GPT4O_REPLY
from tests.helpers.traffic import chat as traffic_chat
from tests.upstream import FakeUpstream, json_reply

MSG: Any = [{"role": "user", "content": "hi"}]
REPLY = GPT4O_REPLY


async def chat(proxy: Proxy, upstream: FakeUpstream, session: str, label: str | None) -> None:
    await traffic_chat(
        proxy, upstream, session, None if label is None else {"X-Spendgate-Session-Label": label}
    )


async def raw_request(proxy: Proxy, label: bytes) -> tuple[int, bytes]:
    """A request whose label header carries exactly these bytes (clients refuse some)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    body = json.dumps({"model": "gpt-4o", "messages": MSG}).encode()
    writer.write(
        b"POST /s/raw/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"X-Spendgate-Session-Label: " + label + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def test_the_header_labels_the_session_everywhere(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    label = "Refactor auth: ticket #42"  # the SDKs send ASCII header values
    async with EventsClient(proxy.http, proxy.url("/api/events?types=session.label")) as ev:
        await chat(proxy, upstream, "run-7", label)
        got = await ev.wait_for(lambda e: e.type == "session.label")
        await chat(proxy, upstream, "run-7", label)  # the same label: no change, no event
        await chat(proxy, upstream, "run-7", None)  # no header: the label stays
        await asyncio.sleep(0.1)
    assert got.data == {"sessionId": "run-7", "label": label}
    assert [e.type for e in ev.events] == ["session.label"]
    assert (await proxy.cost("run-7"))["label"] == label
    (listed,) = (await proxy.get_json("/api/sessions"))["sessions"]
    assert listed["label"] == label and listed["messageCount"] == 3
    (row,) = (await proxy.get_json("/api/report?by=session"))["rows"]
    assert row["key"] == "run-7" and row["label"] == label
    exported = await proxy.get_json("/api/sessions/run-7/export?format=json")
    assert [r["sessionLabel"] for r in exported] == [label] * 3
    async with proxy.http.get(proxy.url("/api/sessions/run-7/export")) as resp:
        lines = (await resp.text()).splitlines()
    assert lines[0].endswith(",sessionLabel") and all(ln.endswith("," + label) for ln in lines[1:])
    assert len(upstream.seen) == 3
    for request in upstream.seen:  # never forwarded
        assert "X-Spendgate-Session-Label" not in request.headers


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"red \x1b[31mALERT", "U+001B at 4"),  # a terminal escape
        (b"a\x7fb", "U+007F"),
        ("evil\u202egnp.exe".encode(), "bidirectional"),  # right-to-left override, as UTF-8
        (b"x" * (MAX_LABEL + 1), f"at most {MAX_LABEL} characters (got {MAX_LABEL + 1})"),
    ],
)
async def test_a_bad_label_header_is_a_400_and_nothing_is_forwarded(
    proxy: Proxy, upstream: FakeUpstream, raw: bytes, says: str
) -> None:
    status, body = await raw_request(proxy, raw)
    assert status == 400, body
    if raw.isascii() and not raw.isalnum():  # C0 and DEL: aiohttp's parser refuses first
        assert b"Invalid header value char" in body
    else:
        message = json.loads(body)["error"]["message"]
        assert "invalid X-Spendgate-Session-Label header" in message and says in message
    assert upstream.seen == []
    assert proxy.ledger.session("raw") is None  # no session made either


async def test_a_header_in_utf8_is_read_as_utf8_and_other_bytes_are_refused(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(json_reply(REPLY))
    status, _ = await raw_request(proxy, "café ✓".encode())
    assert status == 200
    assert (await proxy.cost("raw"))["label"] == "café ✓"
    # Bytes that are not UTF-8 reach the handler as surrogates (aiohttp's
    # surrogateescape): refused, so nothing unwritable is ever stored.
    status, body = await raw_request(proxy, b"caf\xe9 \xff")
    assert status == 400 and "U+DCE9 at 3" in json.loads(body)["error"]["message"]
    assert (await proxy.cost("raw"))["label"] == "café ✓"


async def test_max_length_and_an_empty_header(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(json_reply(REPLY), json_reply(REPLY))
    status, _ = await raw_request(proxy, ("é" * MAX_LABEL).encode())  # characters, not bytes
    assert status == 200
    assert (await proxy.cost("raw"))["label"] == "é" * MAX_LABEL
    status, _ = await raw_request(proxy, b"   ")  # empty: ignored, not cleared
    assert status == 200
    assert (await proxy.cost("raw"))["label"] == "é" * MAX_LABEL


async def test_the_api_sets_and_clears_and_a_restart_keeps_it(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    url = proxy.url("/api/sessions/planned/label")
    async with proxy.http.put(url, json={"label": "night batch"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["label"] == "night batch"  # a session made for it
    await chat(proxy, upstream, "planned", None)
    await proxy.server.close()
    again = await start_proxy()
    assert (await again.cost("planned"))["label"] == "night batch"
    url = again.url("/api/sessions/planned/label")
    for body in ({"label": None}, {"label": ""}):
        async with again.http.put(url, json={"label": "x"}) as resp:
            assert resp.status == 200
        async with again.http.put(url, json=body) as resp:
            assert resp.status == 200 and (await resp.json())["label"] is None


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"label": 5}', 'body must be {"label"'),
        (b'{"name": "x"}', 'body must be {"label"'),
        (b"not json", 'body must be {"label"'),
        (b'["label"]', 'body must be {"label"'),
        (b'{"label": "a\\u0000b"}', "U+0000"),
        (b'{"label": "a\\u2066b"}', "bidirectional"),
        (b'{"label": "\\ud800"}', 'body must be {"label"'),  # a lone surrogate: not JSON
        (('{"label": "' + "y" * 201 + '"}').encode(), "at most 200 characters"),
    ],
)
async def test_the_api_refuses_bad_labels(proxy: Proxy, body: bytes, says: str) -> None:
    async with proxy.http.put(proxy.url("/api/sessions/s1/label"), data=body) as resp:
        assert resp.status == 400
        assert says in (await resp.json())["error"]["message"]
    assert proxy.ledger.session("s1") is None
    async with proxy.http.put(proxy.url("/api/sessions/bad%20id/label"), json={}) as resp:
        assert resp.status == 400


async def test_budget_events_carry_the_label(proxy: Proxy, upstream: FakeUpstream) -> None:
    async with proxy.http.put(proxy.url("/api/sessions/b/budget"), json={"budgetUsd": 0.001}):
        pass
    async with EventsClient(proxy.http, proxy.url("/api/events?types=budget.paused")) as ev:
        await chat(proxy, upstream, "b", "tight")  # $0.0035 on a $0.001 budget
        paused = await ev.wait_for(lambda e: e.type == "budget.paused")
    assert paused.data["sessionLabel"] == "tight" and paused.data["scope"] == "session"


async def test_the_command_line_labels_through_the_proxy(
    proxy: Proxy,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    await chat(proxy, upstream, "cli", None)
    assert await asyncio.to_thread(main, ["label", "cli", "from the shell"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "from the shell"
    assert await asyncio.to_thread(main, ["label", "cli", "a\tb"]) == 1
    assert "U+0009" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["label", "cli"]) == 2
    assert await asyncio.to_thread(main, ["label", "cli", "x", "--clear"]) == 2
    capsys.readouterr()
    await proxy.server.close()  # the reports read the file
    db = str(proxy.settings.db_path)
    assert await asyncio.to_thread(main, ["sessions", "--db", db]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("cli ")]
    assert line.rstrip().endswith("from the shell")
    assert await asyncio.to_thread(main, ["report", "cli", "--db", db]) == 0
    assert capsys.readouterr().out.startswith("cli (from the shell)")


def test_clean_label() -> None:
    assert clean_label("  a b  ") == "a b" and clean_label(" \t ") is None
    assert clean_label("日本語のラベル 🚀") == "日本語のラベル 🚀"
    assert clean_label("👩‍💻 pair") == "👩‍💻 pair"  # a zero-width joiner is not refused
    for bad in (
        "a\nb",
        "a\rb",
        "a\x85b",
        "a\x1bb",
        "a\x9bb",
        "a\u2028b",
        "\ufeffx",
        "a\u200fb",
        "\udcff",
    ):
        with pytest.raises(ValueError):
            clean_label(bad)
