"""The dashboard page: served self-contained, then driven in a real headless Chromium.

The browser tests need Debian's ``chromium`` (or ``SPENDGATE_CHROMIUM``) and the
``playwright`` Python package; without them they skip, saying which is missing. Set
``SPENDGATE_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to keep the README's screenshot
(``python docs/make_screenshot.py`` does that).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate.render import total_usd
from tests.conftest import Proxy, StartProxy, eventually
from tests.helpers.gate import Gate
from tests.upstream import FakeUpstream, json_reply, sse_reply

WAIT_MS = 10_000  # every browser wait is bounded by this
CHROMIUM = (
    os.environ.get("SPENDGATE_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

MISSING = (
    "browser test needs the playwright package (pip install playwright)"
    if not HAVE_PLAYWRIGHT
    else "browser test needs Chromium (apt-get install chromium, or set SPENDGATE_CHROMIUM)"
    if CHROMIUM is None
    else None
)
needs_browser = pytest.mark.skipif(
    MISSING is not None and not os.environ.get("SPENDGATE_REQUIRE_BROWSER"),
    reason=str(MISSING),
)
"""Skipped without a browser, unless ``SPENDGATE_REQUIRE_BROWSER`` is set (CI): then they fail."""


# --- traffic --------------------------------------------------------------------------------


def completion(model: str, prompt: int, output: int, cached: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def chunk(content: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": []
        if usage
        else [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        "usage": usage,
    }


async def chat(
    proxy: Proxy, upstream: FakeUpstream, session: str, model: str, prompt: int, output: int,
    cached: int = 0, agent: str | None = None,
) -> None:  # fmt: skip
    """One non-streaming chat completion through the proxy with the official SDK."""
    upstream.queue(json_reply(completion(model, prompt, output, cached)))
    path = f"/s/{session}" + (f"/a/{agent}" if agent else "") + "/openai/v1"
    async with openai.AsyncOpenAI(base_url=proxy.url(path), api_key="sk-t", max_retries=0) as c:
        await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


# --- the page as served ---------------------------------------------------------------------


async def test_page_is_self_contained_with_a_strict_policy(proxy: Proxy) -> None:
    async with proxy.http.get(proxy.url("/")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    # Works offline: nothing is loaded from anywhere but this origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert csp.count("'sha256-") == 2  # the one script and the one style
    # Event data goes in as text, never as markup.
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html


async def test_page_needs_the_admin_token_when_one_is_set(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    for query, title in (("", "needs the admin token"), ("?token=nope", "token is wrong")):
        async with proxy.http.get(proxy.url("/" + query)) as resp:
            assert resp.status == 401
            assert resp.content_type == "text/html"  # a page that explains, not raw JSON
            html = await resp.text()
            assert "'unsafe-inline'" not in resp.headers["Content-Security-Policy"]
        assert title in html and "/?token=" in html and "SPENDGATE_ADMIN_TOKEN" in html
        assert "nope" not in html  # nothing from the request is echoed
    async with proxy.http.get(proxy.url("/"), headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
    async with proxy.http.get(proxy.url("/?token=s3cret")) as resp:
        assert resp.status == 200
    async with proxy.http.get(proxy.url("/api/sessions")) as resp:  # the API still says JSON
        assert resp.status == 401 and resp.content_type == "application/json"


# --- in the browser -------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if MISSING is not None:
        pytest.fail(f"SPENDGATE_REQUIRE_BROWSER is set, but the {MISSING}")
    async with async_playwright() as pw:
        expect.set_options(timeout=WAIT_MS)
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield b
        finally:
            await b.close()


async def open_dashboard(browser: Browser, proxy: Proxy, query: str = "") -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    await page.goto(proxy.url("/" + query))
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await page.evaluate("window.__notReloaded = true")
    page.errors = errors  # type: ignore[attr-defined]
    return page


def card(page: Page, session: str) -> Any:
    return page.locator(f'section.session[data-session="{session}"]')


async def assert_no_reload_and_no_errors(page: Page) -> None:
    assert await page.evaluate("window.__notReloaded === true")
    assert page.errors == []  # type: ignore[attr-defined]


@needs_browser
async def test_sessions_cost_and_context_update_live(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    page = await open_dashboard(browser, proxy)
    await expect(page.locator("#empty")).to_be_visible()

    # gpt-4o: $2.50/M in, $10/M out, 128,000-token window.
    # 110,000 in + 5,000 out = $0.325; context 115,000 / 128,000 = 89.8 % → warning.
    await chat(proxy, upstream, "run-a", "gpt-4o", 110_000, 5_000)
    c = card(page, "run-a")
    await expect(c.locator(".session-cost")).to_have_text("$0.3250")
    await expect(c.locator(".total-in")).to_have_text("110,000")
    await expect(c.locator(".total-out")).to_have_text("5,000")
    await expect(c.locator(".ctx-fill")).to_have_attribute("data-level", "warning")
    await expect(c.locator(".ctx-text")).to_contain_text("115,000 / 128,000 tokens (89.8%)")
    await expect(c.locator(".msg-row")).to_have_count(1)
    await expect(c.locator(".msg-row .badge.cost")).to_have_text("$0.3250")
    await expect(page.locator("#empty")).to_be_hidden()

    # A second message: 116,000 + 2,000 = $0.31 more; 118,000 / 128,000 = 92.2 % → critical.
    await chat(proxy, upstream, "run-a", "gpt-4o", 116_000, 2_000)
    await expect(c.locator(".session-cost")).to_have_text("$0.6350")
    await expect(c.locator(".total-in")).to_have_text("226,000")
    await expect(c.locator(".total-msgs")).to_have_text("2")
    await expect(c.locator(".ctx-fill")).to_have_attribute("data-level", "critical")
    await expect(c.locator(".msg-row")).to_have_count(2)
    await expect(c.locator(".msg-row .badge.cost").first).to_have_text("$0.3100")  # newest first
    assert await c.locator("svg.spark polyline").get_attribute("points")
    await expect(c.locator(".burn")).to_contain_text("/min")

    # A model without a price: its cost is N/A, never $0, and the tokens still count.
    await chat(proxy, upstream, "run-b", "my-private-model", 700, 20)
    b = card(page, "run-b")
    await expect(b.locator(".session-cost")).to_have_text("N/A")
    await expect(b.locator(".msg-row .badge.cost")).to_have_text("N/A")
    await expect(b.locator(".total-in")).to_have_text("700")
    await expect(page.locator("section.session").first).to_have_attribute("data-session", "run-b")

    # Model names come from upstream responses: they are shown as text, never run as markup.
    evil = '<img src=x onerror="window.__xss = 1">'
    await chat(proxy, upstream, "run-x", evil, 10, 1)
    x = card(page, "run-x")
    await expect(x.locator(".msg-row td.model")).to_have_text(evil)
    assert await x.locator("img").count() == 0
    assert await page.evaluate("window.__xss === undefined")

    await assert_no_reload_and_no_errors(page)
    shot = await page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
    await assert_not_blank(browser, shot)


@needs_browser
async def test_totals_with_unpriced_messages_are_never_a_plain_number(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    page = await open_dashboard(browser, proxy)
    # gpt-4o: 1,000 × 2.5 + 100 × 10 µ$ = $0.0035 a message; my-private-model has no price.
    for session, model in (
        ("all-priced", "gpt-4o"), ("all-priced", "gpt-4o"), ("mixed", "gpt-4o"),
        ("mixed", "my-private-model"), ("all-unpriced", "my-private-model"),
    ):  # fmt: skip
        await chat(proxy, upstream, session, model, 1_000, 100)
    shown = {
        "all-priced": ("$0.007000", "no budget ($0.007000 spent)"),
        "mixed": ("$0.003500 + N/A", "no budget ($0.003500 + N/A spent)"),
        "all-unpriced": ("N/A", "no budget (N/A spent)"),  # never $0.00
    }
    later = await open_dashboard(browser, proxy)  # reads the session list and summaries
    for p in (page, later):  # the first was fed by the events
        for session, (cost, budget) in shown.items():
            c = card(p, session)
            msgs = "1" if session == "all-unpriced" else "2"
            await expect(c.locator(".total-msgs")).to_have_text(msgs)
            await expect(c.locator(".session-cost")).to_have_text(cost)
            await expect(c.locator(".budget-text")).to_have_text(budget)
        await expect(p.locator("#total")).to_have_text("$0.0105 + N/A")
        mixed = card(p, "mixed").locator(".session-cost")
        await expect(mixed).to_have_attribute("title", re.compile(r"1 of 2 messages have no price"))
        await expect(card(p, "all-unpriced").locator(".session-cost")).to_have_class(
            re.compile(r"\bna\b")
        )
    # A partial actual is no basis for "vs actual".
    c = card(page, "mixed")
    await c.locator("details.compare > summary").click()
    await expect(c.locator("tr.cmp-row.used td:nth-child(4)")).to_have_text("—")
    c = card(page, "all-priced")
    await c.locator("details.compare > summary").click()
    await expect(c.locator("tr.cmp-row.used td:nth-child(4)")).to_have_text("same")
    await assert_no_reload_and_no_errors(page)
    await assert_no_reload_and_no_errors(later)


@needs_browser
async def test_the_page_formats_totals_by_the_rule_of_the_command_line(
    browser: Browser, proxy: Proxy
) -> None:
    """``totalUsd`` in the page and ``render.total_usd`` give the same text for any total."""
    async with proxy.http.get(proxy.url("/")) as resp:
        html = await resp.text()
    functions = [
        m.group(0)
        for name in ("usd", "totalUsd")
        if (m := re.search(rf"^  function {name}\(.*?^  }}$", html, re.M | re.S))
    ]
    assert len(functions) == 2
    cases = [
        (None, 0, 0), (0.0, 0, 0), (0.0392, 2, 0), (0.035, 2, 1), (0.0, 2, 1), (None, 2, 2),
        (0.0, 2, 2), (0.00021, 1, 0), (1234.5, 10, 3), (4.96, 3, 3),
    ]  # fmt: skip
    page = await browser.new_page()
    try:
        got = await page.evaluate(
            f"(cases) => {{ {''.join(functions)} return cases.map((c) => totalUsd(...c)); }}",
            cases,
        )
    finally:
        await page.close()
    assert got == [total_usd(*c) for c in cases]


@needs_browser
async def test_a_running_stream_shows_up_before_it_ends(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    page = await open_dashboard(browser, proxy)
    events = [chunk("word " * 20) for _ in range(50)]  # five seconds: time to look mid-stream
    upstream.queue(
        sse_reply(
            [*events, chunk(usage={"prompt_tokens": 10, "completion_tokens": 800})], delay=0.1
        )
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/s/streamer/openai/v1"), api_key="k", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "go"}], stream=True
        )
        c = card(page, "streamer")
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:  # mid-stream: a live row with an estimate, the session marked streaming
                await expect(c.locator("tr.msg-row.live")).to_have_count(1)
                await expect(c.locator(".streaming")).to_be_visible()
                await expect(c.locator("tr.msg-row.live .badge.cost")).to_contain_text("~$")
    # At the end the provider's numbers replace the estimate: 10 × 2.5 + 800 × 10 = $0.008025.
    await expect(c.locator("tr.msg-row.live")).to_have_count(0)
    await expect(c.locator(".msg-row .badge.cost")).to_have_text("$0.008025")
    await expect(c.locator(".session-cost")).to_have_text("$0.008025")
    await expect(c.locator(".streaming")).to_be_hidden()
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_resume_button_lifts_a_pause_with_the_admin_token(
    browser: Browser, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    await chat(proxy, upstream, "run-p", "gpt-4o-mini", 1_000, 100)
    page = await open_dashboard(browser, proxy, "?token=s3cret")
    c = card(page, "run-p")
    await expect(c.locator(".session-cost")).to_have_text("$0.000210")  # 1000 × 0.15 + 100 × 0.6 µ$
    await expect(c.locator("button.resume")).to_be_hidden()

    async with proxy.http.post(proxy.url("/api/sessions/run-p/pause"), headers=auth) as resp:
        assert resp.status == 200
    await expect(c).to_have_class(re.compile(r"\bpaused\b"))
    await expect(c.locator(".state")).to_have_text("PAUSED")
    await c.locator("button.resume").click()
    await expect(c).not_to_have_class(re.compile(r"\bpaused\b"))
    await expect(c.locator("button.resume")).to_be_hidden()

    async def resumed() -> bool:
        data = await proxy.get_json("/api/sessions/run-p/cost", headers=auth)
        return data["paused"] is False

    await eventually(resumed)
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_the_token_page_leads_to_the_dashboard(
    browser: Browser, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    page = await browser.new_page()
    try:
        await page.goto(proxy.url("/"))
        await expect(page.locator("#token-needed h1")).to_have_text(
            "This dashboard needs the admin token"
        )
        await page.locator("input[name=token]").fill("s3cret")
        await page.locator("button[type=submit]").click()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        assert page.url.endswith("/?token=s3cret")
    finally:
        await page.close()


@needs_browser
async def test_reconnects_after_the_stream_is_dropped(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    page = await open_dashboard(browser, proxy)
    await chat(proxy, upstream, "run-r", "gpt-4o", 1_000, 100)
    c = card(page, "run-r")
    await expect(c.locator(".total-msgs")).to_have_text("1")
    await proxy.bus.close()  # what the proxy does to a subscriber that fell behind

    async def resubscribed() -> bool:
        return proxy.bus.subscriber_count > 0

    await eventually(resubscribed, timeout=WAIT_MS / 1000)
    await chat(proxy, upstream, "run-r", "gpt-4o", 1_000, 100)
    await expect(c.locator(".total-msgs")).to_have_text("2")
    await expect(c.locator(".session-cost")).to_have_text("$0.007000")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_model_comparison_and_badge_toggle(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    await chat(proxy, upstream, "run-c", "gpt-4o", 20_000, 1_000, cached=10_000)
    page = await open_dashboard(browser, proxy)
    c = card(page, "run-c")
    # 10,000 × 2.5 + 10,000 × 1.25 + 1,000 × 10 = 47,500 µ$
    await expect(c.locator(".session-cost")).to_have_text("$0.0475")
    await c.locator("details.compare > summary").click()
    rows = c.locator("tr.cmp-row:not(.small)")  # rows too small for the prompt come last
    await expect(rows.first).to_be_visible()
    costs = [
        float(t.replace("$", "").replace(",", ""))
        for t in await rows.locator("td:nth-child(3)").all_text_contents()
    ]
    assert len(costs) >= 5 and costs == sorted(costs)  # cheapest first
    used = c.locator("tr.cmp-row.used")
    await expect(used).to_have_count(1)
    await expect(used.locator("td:nth-child(3)")).to_have_text("$0.0475")
    await expect(used.locator("td:nth-child(4)")).to_have_text("same")

    # The per-message cost badges can be hidden, and the choice survives a reload.
    badge = c.locator(".msg-row .badge.cost")
    await expect(badge).to_be_visible()
    await page.locator("#badges").uncheck()
    await expect(badge).to_be_hidden()
    await page.reload()
    await expect(card(page, "run-c").locator(".msg-row")).to_have_count(1)
    await expect(card(page, "run-c").locator(".msg-row .badge.cost")).to_be_hidden()
    assert not await page.locator("#badges").is_checked()


@needs_browser
async def test_screenshot_of_a_few_sessions(
    browser: Browser, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A screenshot with traffic in it; also the README's image when asked for."""
    # Every session has a budget; local-llama's model has no price, so it runs unmetered.
    proxy = await start_proxy(default_session_budget_usd=2.0, unpriced_models="allow")
    page = await open_dashboard(browser, proxy)
    for prompt, output in ((12_000, 900), (30_000, 1_400), (52_000, 2_100), (81_000, 2_600)):
        await chat(
            proxy, upstream, "refactor-auth", "claude-sonnet-4-5", prompt, output, agent="planner"
        )
    for prompt, output in ((4_000, 300), (9_000, 700), (15_000, 900)):
        await chat(proxy, upstream, "docs-writer", "gpt-4o-mini", prompt, output)
    for prompt, output in ((90_000, 3_000), (104_000, 4_000), (112_000, 4_500)):
        await chat(proxy, upstream, "bugfix-1423", "gpt-4o", prompt, output, cached=60_000)
    await chat(proxy, upstream, "local-llama", "llama-3-private", 3_000, 400)
    async with proxy.http.put(
        proxy.url("/api/sessions/bugfix-1423/budget"), json={"budgetUsd": 0.8}
    ) as resp:
        assert resp.status == 200
    await chat(proxy, upstream, "bugfix-1423", "gpt-4o", 118_000, 2_000, cached=100_000)
    b = card(page, "bugfix-1423")
    await expect(b).to_have_class(re.compile(r"\bpaused\b"))
    await expect(b.locator(".ctx-fill")).to_have_attribute("data-level", "critical")
    await expect(b.locator(".total-msgs")).to_have_text("4")
    await expect(b.locator(".total-in")).to_have_text("424,000")
    r = card(page, "refactor-auth")
    await expect(r.locator(".total-msgs")).to_have_text("4")
    # The agent's meter follows its latest chat row: 81,000 + 2,600 of a 200,000 window.
    await expect(r.locator('.agent[data-agent="planner"] .ctx-text')).to_have_text(
        "83,600 / 200,000 tokens (41.8%) · claude-sonnet-4-5"
    )
    await r.locator("details.compare > summary").click()
    await expect(r.locator("tr.cmp-row.used")).to_have_count(1)
    await expect(page.locator("svg#chart rect.spend-bar")).to_have_count(1)  # all in this hour
    await expect(page.locator("#today")).to_have_text("$1.48 + N/A")
    await page.evaluate("window.scrollTo(0, 0)")
    shot = await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    await assert_not_blank(browser, shot)
    target = os.environ.get("SPENDGATE_DASHBOARD_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)
    await assert_no_reload_and_no_errors(page)


async def order(page: Page) -> list[str]:
    """The session ids of the cards shown, top to bottom."""
    ids: list[str] = await page.locator("section.session:not([hidden])").evaluate_all(
        "els => els.map((e) => e.dataset.session)"
    )
    return ids


async def set_in_dialog(page: Page, value: str) -> None:
    await expect(page.locator("#budget-dialog")).to_be_visible()
    await page.locator("#budget-input").fill(value)
    await page.locator("#budget-set").click()


@needs_browser
async def test_session_agent_and_global_budgets_are_set_from_the_page(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    # gpt-4o: 10,000 × 2.5 + 1,000 × 10 µ$ = $0.035.
    await chat(proxy, upstream, "run-b", "gpt-4o", 10_000, 1_000, agent="coder")
    page = await open_dashboard(browser, proxy)
    c = card(page, "run-b")
    await expect(c.locator(".session-cost")).to_have_text("$0.0350")

    # Bad input is explained in the dialog, which keeps what was typed; nothing is sent.
    await c.locator("button.budget-edit").click()
    await set_in_dialog(page, "ten dollars")
    await expect(page.locator("#budget-error")).to_contain_text("enter an amount in USD")
    await expect(page.locator("#budget-input")).to_have_value("ten dollars")
    assert (await proxy.cost("run-b"))["budgetUsd"] is None
    await set_in_dialog(page, "$2.50")
    await expect(page.locator("#budget-dialog")).to_be_hidden()
    await expect(c.locator(".budget-text")).to_have_text("$0.0350 of $2.50 (1.4%)")
    assert (await proxy.cost("run-b"))["budgetUsd"] == 2.5

    # Lowered to below the spend: over budget, and the action offered raises it (a resume
    # would be refused with a 409 while over).
    await c.locator("button.budget-edit").click()
    await set_in_dialog(page, "0.01")
    await expect(c.locator(".head .state")).to_have_text("OVER BUDGET")
    await expect(c.locator(".state-line .why")).to_contain_text("requests get a 402")
    await expect(c.locator("button.resume")).to_have_count(0)
    await c.locator(".state-line button.raise").click()
    await expect(page.locator("#budget-input")).to_have_value("0.06")  # half as much again
    await page.locator("#budget-set").click()
    await expect(c.locator(".state-line")).to_be_hidden()
    summary = await proxy.cost("run-b")
    assert summary["budgetUsd"] == 0.06 and summary["paused"] is False
    await c.locator("button.budget-edit").click()
    await page.locator("#budget-unlimited").click()
    await expect(c.locator(".budget-text")).to_have_text("no budget ($0.0350 spent)")
    assert (await proxy.cost("run-b"))["budgetUsd"] is None

    # The agent's budget, from its row in the card.
    agent = c.locator('.agent[data-agent="coder"]')
    await expect(agent.locator(".agent-budget")).to_have_text("no agent budget")
    await agent.locator("button.agent-budget-edit").click()
    await set_in_dialog(page, "0.02")
    await expect(agent.locator(".agent-budget")).to_have_text("agent budget $0.0350 of $0.0200")
    await expect(agent.locator(".agent-state")).to_have_text("OVER BUDGET")
    got = (await proxy.cost("run-b"))["byAgent"]["coder"]
    assert got["budgetUsd"] == 0.02 and got["paused"] is True

    # The global budget, from the toolbar.
    await page.locator("#global-edit").click()
    await set_in_dialog(page, "100")
    await expect(page.locator("#global-text")).to_have_text("$0.0350 of $100.00")
    assert (await proxy.get_json("/api/budget"))["budgetUsd"] == 100
    await page.locator("#global-edit").click()
    await set_in_dialog(page, "0.03")
    await expect(page.locator("#global-state")).to_be_visible()
    await expect(page.locator("#global-state .why")).to_contain_text("Global budget: Over budget")
    await page.locator("#global-state button.lift").click()
    await page.locator("#budget-unlimited").click()
    await expect(page.locator("#global-state")).to_be_hidden()
    await expect(page.locator("#global-text")).to_have_text("unlimited")
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_waiting_requests_show_with_the_action_that_admits_them(
    browser: Browser, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(admission_wait_s=20)
    async with proxy.http.put(
        proxy.url("/api/sessions/run-w/budget"), json={"budgetUsd": 0.01}
    ) as resp:
        assert resp.status == 200
    upstream.gate = Gate()  # type: ignore[attr-defined]

    async def bounded() -> None:
        """600 output tokens at most: $0.006 reserved, so two do not fit in $0.01."""
        upstream.queue(json_reply(completion("gpt-4o", 10, 5)))
        async with openai.AsyncOpenAI(
            base_url=proxy.url("/s/run-w/openai/v1"), api_key="k", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o", max_tokens=600, messages=[{"role": "user", "content": "x"}]
            )

    first = asyncio.create_task(bounded())
    await upstream.gate.until_held(1)  # type: ignore[attr-defined]
    second = asyncio.create_task(bounded())

    async def queued() -> bool:
        return (await proxy.ledger.pressure("run-w")).waiting == 1

    await eventually(queued)
    page = await open_dashboard(browser, proxy)
    c = card(page, "run-w")
    await expect(c.locator(".head .state")).to_have_text("WAITING")
    await expect(c.locator(".state-line .why")).to_contain_text("1 request waits")
    await expect(c.locator(".state-line .why")).to_contain_text("429 (budget_reserved)")
    await c.locator(".state-line button.raise").click()
    await set_in_dialog(page, "1")
    await upstream.gate.until_held(2)  # type: ignore[attr-defined]  # raising admitted it
    upstream.gate.set()  # type: ignore[attr-defined]
    await asyncio.gather(first, second)
    await expect(c.locator(".state-line")).to_be_hidden()
    await expect(c.locator(".total-msgs")).to_have_text("2")
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_search_sort_and_a_stable_order(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    # Costs: beta $0.035 > gamma $0.006 > alpha $0.00021; activity: gamma, beta, alpha.
    await chat(proxy, upstream, "alpha", "gpt-4o-mini", 1_000, 100, agent="planner")
    await chat(proxy, upstream, "beta", "gpt-4o", 10_000, 1_000)
    await chat(proxy, upstream, "gamma", "gpt-4o", 2_000, 100, agent="reviewer")
    page = await open_dashboard(browser, proxy)
    await expect(card(page, "alpha").locator(".total-msgs")).to_have_text("1")
    assert await order(page) == ["gamma", "beta", "alpha"]
    await page.locator("#sort").select_option("cost")
    assert await order(page) == ["beta", "gamma", "alpha"]
    # New spend that leaves the ranking as it is moves nothing.
    await chat(proxy, upstream, "alpha", "gpt-4o-mini", 1_000, 100, agent="planner")
    await expect(card(page, "alpha").locator(".total-msgs")).to_have_text("2")
    assert await order(page) == ["beta", "gamma", "alpha"]
    # Spend that passes the others moves the card: the sort says so.
    await chat(proxy, upstream, "alpha", "gpt-4o", 20_000, 1_000)
    await expect(card(page, "alpha").locator(".session-cost")).to_have_text("$0.0604")
    await expect(page.locator("section.session").first).to_have_attribute("data-session", "alpha")
    assert await order(page) == ["alpha", "beta", "gamma"]

    search = page.locator("#search")
    for query, shown in (
        ("reviewer", ["gamma"]),  # an agent
        ("gpt-4o-mini", ["alpha"]),  # a model
        ("BET", ["beta"]),  # a session, any case
        ("", ["alpha", "beta", "gamma"]),
    ):
        await search.fill(query)
        await expect(page.locator("section.session:not([hidden])")).to_have_count(len(shown))
        assert await order(page) == shown, query
    await search.fill("nothing-like-it")
    await expect(page.locator("#nomatch")).to_be_visible()
    await page.reload()  # the sort is remembered
    await expect(page.locator("#sort")).to_have_value("cost")
    await expect(card(page, "gamma").locator(".total-msgs")).to_have_text("1")
    assert await order(page) == ["alpha", "beta", "gamma"]


@needs_browser
async def test_session_labels_are_shown_and_searched(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    await chat(proxy, upstream, "run-l", "gpt-4o", 1_000, 100)
    await chat(proxy, upstream, "run-m", "gpt-4o", 1_000, 100)
    label = "<b>fix the login bug</b>"
    async with proxy.http.put(
        proxy.url("/api/sessions/run-l/label"), json={"label": label}
    ) as resp:
        assert resp.status == 200
    page = await open_dashboard(browser, proxy)
    c = card(page, "run-l")
    await expect(c.locator(".label-text")).to_have_text(label)  # as text, never markup
    assert await c.locator(".label-text b").count() == 0
    await expect(card(page, "run-m").locator(".label-text")).to_have_text("")
    await page.locator("#search").fill("LOGIN")
    await expect(page.locator("section.session:not([hidden])")).to_have_count(1)
    assert await order(page) == ["run-l"]
    await assert_no_reload_and_no_errors(page)


@needs_browser
async def test_error_rows_idle_sessions_and_a_context_meter_per_agent(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    # gpt-4o's window is 128,000 tokens.
    await chat(proxy, upstream, "run-e", "gpt-4o", 50_000, 1_000, agent="planner")
    await chat(proxy, upstream, "run-e", "gpt-4o", 100_000, 2_000, agent="coder")
    base = proxy.url("/s/run-e/a/coder/openai/v1")
    async with openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as client:
        # An embedding (8,000 tokens) and error rows: none of them moves the context meter.
        upstream.queue(json_reply({
            "object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
            "usage": {"prompt_tokens": 8_000, "total_tokens": 8_000},
        }))  # fmt: skip
        await client.embeddings.create(model="text-embedding-3-small", input="x")
        for status in (429, 500):
            upstream.queue(json_reply({"error": {"message": "no", "type": "x"}}, status=status))
            with pytest.raises(openai.APIStatusError):
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
    await chat(proxy, upstream, "embed-only", "gpt-4o", 0, 0)  # a row without tokens
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    await page.clock.install()
    await page.goto(proxy.url("/"))
    c = card(page, "run-e")
    await expect(c.locator(".total-msgs")).to_have_text("5")
    planner = c.locator('.agent[data-agent="planner"] .ctx-text')
    coder = c.locator('.agent[data-agent="coder"] .ctx-text')
    await expect(planner).to_have_text("51,000 / 128,000 tokens (39.8%) · gpt-4o")
    await expect(coder).to_have_text("102,000 / 128,000 tokens (79.7%) · gpt-4o")
    await expect(c.locator(".ctx-none")).to_have_count(0)  # never "no messages yet" here
    errors = c.locator("tr.msg-row.err td.status")
    await expect(errors).to_have_count(2)
    await expect(errors.nth(0)).to_have_text("⚠ 500 upstream error")
    await expect(errors.nth(1)).to_have_text("⚠ 429 rate limited")
    e = card(page, "embed-only")
    await expect(e.locator(".total-msgs")).to_have_text("1")
    await expect(e.locator(".ctx-none")).to_have_text(
        "no chat or messages requests yet: no context to show"
    )
    await expect(c.locator(".burn")).to_contain_text("/min")
    await page.clock.fast_forward("06:00")  # five minutes without a message: idle
    await expect(c.locator(".burn")).to_have_text("idle")
    await expect(c.locator(".eta")).to_have_text("unlimited")
    await page.close()


@needs_browser
async def test_usable_at_400_px(
    browser: Browser, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(default_session_budget_usd=1.0)
    await chat(proxy, upstream, "a-rather-long-session-name-for-a-phone", "gpt-4o", 90_000, 2_000,
               agent="planner")  # fmt: skip
    page = await browser.new_page(viewport={"width": 400, "height": 900})
    await page.goto(proxy.url("/"))
    c = card(page, "a-rather-long-session-name-for-a-phone")
    await expect(c.locator(".total-msgs")).to_have_text("1")
    await expect(c.locator('.agent[data-agent="planner"] .ctx-text')).to_contain_text("92,000")
    width = await page.evaluate("document.documentElement.scrollWidth")
    wide = await page.evaluate(
        "[...document.querySelectorAll('body *')]"
        ".filter((e) => e.getBoundingClientRect().right > 400 && !e.closest('.msgs'))"
        ".map((e) => e.tagName + '.' + e.className).slice(0, 8)"
    )
    assert width <= 400, f"the page is {width} px wide at 400: {wide}"
    box = await c.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 400
    for button in ("button.pause", "button.budget-edit"):
        b = await c.locator(button).bounding_box()
        assert b is not None and b["x"] + b["width"] <= 400, button
    await c.locator("button.budget-edit").click()
    dialog = await page.locator("#budget-dialog").bounding_box()
    assert dialog is not None and dialog["x"] >= 0 and dialog["x"] + dialog["width"] <= 400
    await page.locator("#budget-cancel").click()
    shot = await page.screenshot(full_page=True)
    await assert_not_blank(browser, shot)
    target = os.environ.get("SPENDGATE_DASHBOARD_SCREENSHOT_NARROW")
    if target:
        Path(target).write_bytes(shot)
    await page.close()


@needs_browser
async def test_spend_over_time_and_the_totals_of_today_and_this_month(
    browser: Browser, proxy: Proxy, upstream: FakeUpstream
) -> None:
    page = await open_dashboard(browser, proxy)
    await expect(page.locator("#today")).to_have_text("$0.00")
    await expect(page.locator("#chart-peak")).to_have_text("no spend in this range")
    # Across sessions: 2 × $0.0035 + $0.035 (gpt-4o), and an unpriced message.
    await chat(proxy, upstream, "run-1", "gpt-4o", 1_000, 100)
    await chat(proxy, upstream, "run-1", "gpt-4o", 1_000, 100)
    await chat(proxy, upstream, "run-2", "gpt-4o", 10_000, 1_000)
    await expect(page.locator("#today")).to_have_text("$0.0420")  # read again after finals
    await expect(page.locator("#month")).to_have_text("$0.0420")
    report = await proxy.get_json("/api/report?by=hour&since=48h")
    (hour,) = report["rows"]
    bar = page.locator(f'svg#chart rect.spend-bar[data-key="{hour["key"]}"]')
    await expect(bar).to_have_count(1)
    label = f"{hour['key']} UTC: $0.0420, 3 messages"
    await expect(bar).to_have_attribute("aria-label", label)
    await expect(page.locator("#chart-peak")).to_have_text("peak $0.0420/hour")
    box = await bar.bounding_box()
    assert box is not None and box["height"] > 60  # the peak fills the chart's 90 px
    await chat(proxy, upstream, "run-3", "my-private-model", 500, 50)
    await expect(page.locator("#today")).to_have_text("$0.0420 + N/A")
    await page.locator("#chart-by").select_option("day")
    (day,) = (await proxy.get_json("/api/report?by=day&since=30d"))["rows"]
    bar = page.locator(f'svg#chart rect.spend-bar[data-key="{day["key"]}"]')
    label = f"{day['key']} UTC: $0.0420 + N/A, 4 messages"
    await expect(bar).to_have_attribute("aria-label", label)
    assert await page.locator("svg#chart rect.spend-bar").count() == 1
    await expect(page.locator("#chart-last")).to_have_text(day["key"])
    await assert_no_reload_and_no_errors(page)


# --- "not blank" ---------------------------------------------------------------------------

COUNT_COLOURS = """async (b64) => {
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.width;
  canvas.height = img.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, img.width, img.height).data;
  const counts = new Map();
  for (let i = 0; i < px.length; i += 4 * 5) {
    const key = (px[i] << 16) | (px[i + 1] << 8) | px[i + 2];
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  return {width: img.width, height: img.height, colours: counts.size,
          top: Math.max(...counts.values()) / (px.length / 20)};
}"""


async def assert_not_blank(browser: Browser, png: bytes) -> None:
    """Decode the PNG (in a blank page of its own) and check it has content, not one colour."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = await browser.new_page()
    try:
        stats = await page.evaluate(COUNT_COLOURS, base64.b64encode(png).decode())
    finally:
        await page.close()
    assert stats["width"] > 100 and stats["height"] > 100
    assert stats["colours"] > 20, f"the screenshot looks blank: {stats}"
    assert stats["top"] < 0.97, f"the screenshot is nearly one colour: {stats}"
