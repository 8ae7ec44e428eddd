"""The per-request meter (spendgate.meter), driven the way the proxy drives it, with
the real accountant, ledger, bus, metrics and SQLite store behind it."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from spendgate import proxy
from spendgate.accounting import Accountant
from spendgate.budgets import MemoryLedger
from spendgate.bus import MemoryBus
from spendgate.meter import CLIENT_CLOSED, Meter
from spendgate.metrics import Metrics
from spendgate.price_files import load_price_table
from spendgate.providers import get_adapter
from spendgate.routing import Route, Target
from spendgate.store import SQLiteStore

ROUTE = Route("openai", "/openai", "http://127.0.0.1:9", "openai", "openai")
SSE = {"Content-Type": "text/event-stream"}


@pytest.fixture
async def acct(tmp_path: Path) -> AsyncIterator[Accountant]:
    store = SQLiteStore(tmp_path / "m.db", flush_interval=0.01)
    await store.open()
    metrics = Metrics(CollectorRegistry())
    yield Accountant(load_price_table(), MemoryLedger([], None), store, MemoryBus(), metrics)
    await store.close()


def chat_meter(acct: Accountant, body: dict[str, object], cut: bool = False) -> Meter:
    adapter = get_adapter("openai")
    raw = orjson.dumps({"model": "gpt-4o-mini", "messages": [], **body})
    info = adapter.inspect("POST", "/v1/chat/completions", {}, raw, inject_stream_usage=False)
    target = Target(ROUTE, "/v1/chat/completions", "s1", None)
    return Meter(acct, adapter, target, info, None, cut)


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def delta(text: str) -> bytes:
    return event({"model": "gpt-4o-mini", "choices": [{"delta": {"content": text}}]})


USAGE = event(
    {"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
)


async def test_a_stream_fed_in_pieces_is_forwarded_unchanged_and_billed_as_reported(
    acct: Accountant,
) -> None:
    meter = chat_meter(acct, {"stream": True})
    assert await meter.admit() is None
    meter.response_started(200, SSE)
    assert acct.metrics.active_streams == 1
    body = delta("Hello") + delta(" world") + USAGE + b"data: [DONE]\n\n"
    sent = b""
    for i in range(0, len(body), 7):  # split anywhere, mid-event included
        piece = body[i : i + 7]
        sent += meter.outgoing(piece)
        assert meter.feed(piece) is False
    sent += meter.body_ended()
    rec = await meter.close()
    assert sent == body
    assert (rec.input_tokens, rec.output_tokens, rec.estimated, rec.aborted) == (7, 3, False, False)
    assert rec.status == 200 and rec.ttft_ms is not None and rec.cost_usd is not None
    assert acct.metrics.active_streams == 0


async def test_decoded_events_are_metered_like_a_body(acct: Accountant) -> None:
    """The other way to feed a meter: one decoded JSON event at a time (a WebSocket)."""
    adapter = get_adapter("openai")
    raw = orjson.dumps({"model": "gpt-4o-mini", "input": "hi", "stream": True})
    info = adapter.inspect("POST", "/v1/responses", {}, raw, inject_stream_usage=False)
    meter = Meter(acct, adapter, Target(ROUTE, "/v1/responses", "s1", None), info)
    meter.response_started(200, SSE)
    response = {"model": "gpt-4o-mini", "usage": {"input_tokens": 11, "output_tokens": 4}}
    for obj in (
        {"type": "response.created", "response": {"model": "gpt-4o-mini"}},
        {"type": "response.output_text.delta", "delta": "Hey"},
        {"type": "response.completed", "response": response},
    ):
        meter.feed_event(orjson.dumps(obj))
    rec = await meter.close()
    assert (rec.model, rec.input_tokens, rec.output_tokens, rec.estimated) == (
        "gpt-4o-mini", 11, 4, False,
    )  # fmt: skip


async def test_the_budget_cut_ends_the_stream_at_an_event_boundary(acct: Accountant) -> None:
    await acct.ledger.set_budget("s1", Decimal("0.0000001"))
    meter = chat_meter(acct, {"stream": True}, cut=True)
    assert await meter.admit() is None
    meter.response_started(200, SSE)
    first = delta("x" * 4000)
    assert meter.outgoing(first) == first
    assert meter.feed(first) is True  # over budget, and the piece ended on a boundary
    tail = meter.cut()
    assert b"budget" in tail and tail.endswith(b"\n\n")
    rec = await meter.close()
    assert rec.error == "budget_cut" and rec.estimated and rec.output_tokens >= 1000


async def test_a_cut_waits_for_the_next_boundary(acct: Accountant) -> None:
    await acct.ledger.set_budget("s1", Decimal("0.0000001"))
    meter = chat_meter(acct, {"stream": True}, cut=True)
    await meter.admit()
    meter.response_started(200, SSE)
    second = delta("y" * 10)
    half = len(second) // 2
    piece = delta("x" * 4000) + second[:half]
    assert meter.outgoing(piece) == piece
    assert meter.feed(piece) is False  # over budget, but mid-event: not yet
    rest = second[half:] + delta("more") + b'data: {"choi'
    assert meter.outgoing(rest) == second[half:] + delta("more")  # whole events only
    assert meter.feed(rest) is True


async def test_a_client_that_leaves_before_the_answer_gets_a_499_row(acct: Accountant) -> None:
    meter = chat_meter(acct, {})
    await meter.admit()
    meter.client_left()
    rec = await meter.close()
    assert (rec.status, rec.aborted, rec.input_tokens, rec.cost_usd) == (
        CLIENT_CLOSED, True, 0, Decimal(0),
    )  # fmt: skip


async def test_an_upstream_failure_is_counted_once_with_its_kind(acct: Accountant) -> None:
    meter = chat_meter(acct, {})
    await meter.admit()
    meter.upstream_failed("connect", "refused", 502)
    rec = await meter.close()
    assert (rec.status, rec.error) == (502, "connect")
    value = acct.metrics.registry.get_sample_value(
        "spendgate_upstream_errors_total", {"route": "openai", "kind": "connect"}
    )
    assert value == 1


async def test_a_broken_stream_is_estimated_and_names_the_break(acct: Accountant) -> None:
    meter = chat_meter(acct, {"stream": True})
    await meter.admit()
    meter.response_started(200, SSE)
    piece = delta("partial answer")
    meter.outgoing(piece)
    meter.feed(piece)
    meter.upstream_failed("reset", "connection reset")
    rec = await meter.close()
    assert (rec.status, rec.error, rec.estimated) == (200, "upstream_reset", True)
    assert rec.output_tokens == 4


def test_the_proxy_handler_does_no_bookkeeping() -> None:
    """proxy.py speaks HTTP: it names no parser, ledger, metric or outcome field."""
    tree = ast.parse(Path(proxy.__file__).read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    forbidden = {"parser", "ledger", "metrics", "store", "bus", "aborted", "error"}
    forbidden |= {"ttft", "reservation", "upstream_errors", "active_streams"}
    assert names & forbidden == set()


@pytest.mark.parametrize("ended", [True, False])
async def test_a_client_leaving_after_the_body_ended_loses_nothing(
    acct: Accountant, ended: bool
) -> None:
    """SDKs close on ``[DONE]`` and Codex on ``response.completed``, before spendgate's
    last write fails: complete, not aborted. Leaving before the end is an abort."""
    meter = chat_meter(acct, {"stream": True})
    assert await meter.admit() is None
    meter.response_started(200, SSE)
    body = delta("Hello") + (USAGE + b"data: [DONE]\n\n" if ended else b"")
    meter.outgoing(body)
    meter.feed(body)
    if ended:
        meter.body_ended()
    meter.client_left()
    rec = await meter.close()
    assert (rec.aborted, rec.estimated) == (not ended, not ended)
    if ended:
        assert (rec.input_tokens, rec.output_tokens) == (7, 3)


async def test_a_whole_body_the_client_did_not_wait_for_is_still_complete(
    acct: Accountant,
) -> None:
    meter = chat_meter(acct, {})
    assert await meter.admit() is None
    meter.response_started(200, {"Content-Type": "application/json"})
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    meter.whole(orjson.dumps({"model": "gpt-4o-mini", "choices": [], "usage": usage}), "")
    meter.client_left()  # the write of the answer failed
    rec = await meter.close()
    assert (rec.aborted, rec.estimated, rec.input_tokens, rec.output_tokens) == (
        False, False, 5, 2,
    )  # fmt: skip
