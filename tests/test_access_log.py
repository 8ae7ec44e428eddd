"""access_log.py (SPENDGATE_ACCESS_LOG, docs/reference.md §1 "Access log"): one line per
proxied request from its row, never a key, a path or a query string, and no line a
hostile model name can split."""

from __future__ import annotations

import logging

import pytest

from spendgate.access_log import MAX_FIELD, field, line
from tests.conftest import Proxy, StartProxy
from tests.helpers.records import message
from tests.upstream import FakeUpstream, chat_completion, json_reply

KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spendgate.access"]


async def chat(proxy: Proxy, model: str, path: str = "/s/logged/a/coder/openai/v1") -> None:
    async with proxy.http.post(
        proxy.url(f"{path}/chat/completions?key={KEY}"),
        json={"model": model, "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.status == 200
        await r.read()


async def test_off_by_default(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spendgate.access")
    upstream.queue(json_reply(chat_completion("gpt-4o-mini")))
    await chat(proxy, "gpt-4o-mini")
    assert access_lines(caplog) == []


async def test_one_line_per_request_from_its_row_without_a_key(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spendgate.access")
    proxy = await start_proxy(access_log=True)
    upstream.queue(
        json_reply(chat_completion("gpt-4o-mini")), json_reply(chat_completion("gpt-4o-mini"))
    )
    await chat(proxy, "gpt-4o-mini")
    await chat(proxy, "gpt-4o-mini", "/s/logged/openai/v1")
    lines = access_lines(caplog)
    assert len(lines) == 2
    row = next(r for r in await proxy.messages("logged") if r["agentId"] == "coder")
    first = lines[0]
    assert first.startswith("POST openai chat session=logged agent=coder model=gpt-4o-mini ")
    assert " status=200 in=1000 out=100 cost=0.00021 " in first  # $0.15 / $0.60 per M
    assert f" ms={row['durationMs']:.1f} " in first  # the row's own duration
    assert first.endswith("stream=false")
    assert " agent=- " in lines[1]
    for text in lines:
        assert KEY not in text and "key=" not in text and "/v1" not in text


def test_a_hostile_model_name_stays_one_quoted_field() -> None:
    rec = message(model='evil\nPOST openai chat session=forged "x"', cost_usd=None)
    text = line("POST", rec)
    assert "\n" not in text
    assert ' model="evil\\nPOST openai chat session=forged \\"x\\"" ' in text
    assert " cost=- " in text
    assert field("x" * 1000) == '"' + "x" * MAX_FIELD + '…"'
    assert field(None) == "-" and field("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"


def test_estimated_aborted_and_errors_are_said() -> None:
    text = line("POST", message(estimated=True, aborted=True, error="upstream_reset"))
    assert text.endswith(" estimated=true aborted=true error=upstream_reset")
