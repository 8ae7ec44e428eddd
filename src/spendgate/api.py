"""The ``/api`` routes (docs/reference.md §8): sessions, cost summaries, messages, export,
budgets, prices."""

from __future__ import annotations

import csv
import io
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spendgate import price_files, pruning, reports
from spendgate.accounting import apply_change
from spendgate.budgets import BudgetLedger, Change, ResumeRefused, SessionView
from spendgate.keys import BUS, LEDGER, PRICES, REGISTRY, SETTINGS, STORE
from spendgate.pricing import PricingError
from spendgate.records import EXPORT_HEADER, AgentBudgetRecord
from spendgate.routing import clean_label, valid_id
from spendgate.store import REPORT_BY
from spendgate.timespec import TimeSpecError, parse

routes = web.RouteTableDef()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def api_error(status: int, message: str) -> web.HTTPException:
    text = orjson.dumps({"error": {"message": message, "status": status}}).decode()
    cls = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        503: web.HTTPServiceUnavailable,
    }[status]
    return cls(text=text, content_type="application/json")


def session_json(view: SessionView) -> dict[str, Any]:
    return reports.session_json(view.record, view.spent, view.pressure)


def _session_id(request: web.Request) -> str:
    sid = request.match_info["id"]
    if not valid_id(sid):
        raise api_error(400, f"invalid session id {sid[:40]!r}")
    return sid


async def _known_session(request: web.Request) -> SessionView:
    """The session as the ledger holds it now (any replica's, with a shared ledger)."""
    sid = _session_id(request)
    view = await request.app[LEDGER].snapshot(sid)
    if view is None:
        raise api_error(404, f"unknown session {sid!r}")
    return view


@routes.get("/api/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    sessions = await reports.sessions_list(request.app[STORE], request.app[LEDGER].spent_of)
    return json_response({"sessions": sessions})


@routes.get("/api/report")
async def report(request: web.Request) -> web.Response:
    """Totals across sessions per hour, day, week, month, model, agent or session
    (docs/reference.md §8)."""
    query = request.query
    by = query.get("by") or "day"
    if by not in REPORT_BY:
        raise api_error(400, f"by must be one of {', '.join(REPORT_BY)}")
    session = query.get("session") or None
    if session is not None and not valid_id(session):
        raise api_error(400, f"invalid session id {session[:40]!r}")
    try:
        since, until = reports.bounds(query.get("since"), query.get("until"), time.time())
    except TimeSpecError as exc:
        raise api_error(400, str(exc)) from None
    found = await reports.over_time(request.app[STORE], by, since, until, session)
    return json_response(found.to_json())


@routes.delete("/api/sessions")
async def prune_sessions(request: web.Request) -> web.Response:
    """Remove the sessions last active before ``before`` (docs/reference.md §5, §8);
    ``dryRun=true``: only say which."""
    query = request.query
    raw = query.get("before")
    if not raw:
        raise api_error(400, "before is required: a date (2026-12-01) or a duration (30d)")
    dry = (query.get("dryRun") or "false").lower()
    if dry not in ("true", "false", "1", "0"):
        raise api_error(400, "dryRun must be true or false")
    try:
        before = parse(raw, time.time(), "before")
    except TimeSpecError as exc:
        raise api_error(400, str(exc)) from None
    dry_run = dry in ("true", "1")
    app = request.app
    pruned, change = await pruning.prune_live(app[STORE], app[LEDGER], before, dry_run)
    apply_change(change, app[STORE], app[BUS])
    return json_response(pruning.pruned_json(pruned, before, dry_run))


@routes.get("/api/sessions/{id}/cost")
async def session_cost(request: web.Request) -> web.Response:
    view = await _known_session(request)
    app = request.app
    ledger, rec = app[LEDGER], view.record
    summary = await reports.session_summary(app[STORE], app[PRICES], rec, view.spent, view.pressure)
    by_agent = summary["byAgent"]
    for agent, spent in await ledger.agent_budgets(rec.id):
        group = by_agent.setdefault(agent.agent_id, {"messageCount": 0, "costUsd": None})
        group.update(await _agent_budget(ledger, agent, spent))
    return json_response(summary)


@routes.get("/api/sessions/{id}/messages")
async def session_messages(request: web.Request) -> web.Response:
    rec = (await _known_session(request)).record
    try:
        after = int(request.query.get("cursor") or 0)
        limit = min(max(int(request.query.get("limit") or 100), 1), 1000)
    except ValueError:
        raise api_error(400, "cursor and limit must be integers") from None
    rows, cursor = await request.app[STORE].messages(rec.id, after, limit)
    return json_response(
        {
            "messages": [m.to_json() for m in rows],
            "nextCursor": None if cursor is None else str(cursor),
        }
    )


@routes.get("/api/sessions/{id}/export")
async def session_export(request: web.Request) -> web.StreamResponse:
    rec = (await _known_session(request)).record
    store = request.app[STORE]
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise api_error(400, "format must be csv or json")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/json",
            "Content-Disposition": f'attachment; filename="spendgate-{rec.id}.{fmt}"',
        }
    )
    await resp.prepare(request)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(EXPORT_HEADER)
        async for m in store.iter_messages(rec.id):
            writer.writerow(m.csv_cells(rec.label))
            if buf.tell() > 1 << 16:
                await resp.write(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
        await resp.write(buf.getvalue().encode())
    else:
        sep = b"["
        async for m in store.iter_messages(rec.id):
            await resp.write(sep + orjson.dumps(m.export_json(rec.label)))
            sep = b","
        await resp.write(b"[]" if sep == b"[" else b"]")
    await resp.write_eof()
    return resp


async def _session_change(request: web.Request, change: Change) -> web.Response:
    app = request.app
    apply_change(change, app[STORE], app[BUS])
    view = await app[LEDGER].snapshot(_session_id(request))
    assert view is not None
    return json_response(session_json(view))


async def _budget_body(request: web.Request) -> Decimal | None:
    """``{"budgetUsd": <USD ≥ 0, or null for unlimited>}``; JSON numbers only."""
    try:
        raw = orjson.loads(await request.read())["budgetUsd"]
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError
        budget = Decimal(str(raw))
        if not budget.is_finite() or budget < 0:
            raise ValueError
        return budget
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, InvalidOperation):
        raise api_error(
            400, 'body must be {"budgetUsd": <USD ≥ 0, or null for unlimited>}'
        ) from None


@routes.put("/api/sessions/{id}/budget")
async def set_budget(request: web.Request) -> web.Response:
    sid = _session_id(request)
    change = await request.app[LEDGER].set_budget(sid, await _budget_body(request))
    return await _session_change(request, change)


@routes.put("/api/sessions/{id}/label")
async def set_label(request: web.Request) -> web.Response:
    """``{"label": "text"}`` sets the session's label, ``{"label": null}`` (or ``""``)
    clears it (docs/reference.md §2, §8)."""
    sid = _session_id(request)
    usage = 'body must be {"label": <text, or null to clear>}'
    try:
        raw = orjson.loads(await request.read())["label"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise api_error(400, usage) from None
    if raw is not None and not isinstance(raw, str):
        raise api_error(400, usage)
    try:
        label = None if raw is None else clean_label(raw)
    except ValueError as exc:
        raise api_error(400, str(exc)) from None
    change = await request.app[LEDGER].set_label(sid, label)
    return await _session_change(request, change)


async def _agent_budget(
    ledger: BudgetLedger, rec: AgentBudgetRecord, spent: Decimal
) -> dict[str, Any]:
    """An agent budget's fields, with what holds its headroom now."""
    pressure = await ledger.pressure(rec.session_id, rec.agent_id)
    return reports.budget_json(rec.budget_usd, spent, rec.paused, rec.pause_reason, pressure)


async def agent_json(
    ledger: BudgetLedger, rec: AgentBudgetRecord, spent: Decimal
) -> dict[str, Any]:
    return {
        "sessionId": rec.session_id,
        "agentId": rec.agent_id,
        **(await _agent_budget(ledger, rec, spent)),
    }


@routes.put("/api/sessions/{id}/agents/{agent}/budget")
async def set_agent_budget(request: web.Request) -> web.Response:
    sid = _session_id(request)
    agent = request.match_info["agent"]
    if not valid_id(agent):
        raise api_error(400, f"invalid agent id {agent[:40]!r}")
    app = request.app
    ledger = app[LEDGER]
    budget = await _budget_body(request)
    if await ledger.unseeded_agent(sid, agent):  # its spend from before start-up, from the rows
        before = await app[STORE].agent_spend([(sid, agent)], ledger.loaded_at)
        await ledger.seed_agent(sid, agent, before[(sid, agent)])
    change = await ledger.set_agent_budget(sid, agent, budget)
    apply_change(change, app[STORE], app[BUS])
    for rec, spent in await ledger.agent_budgets(sid):
        if rec.agent_id == agent:
            return json_response(await agent_json(ledger, rec, spent))
    unlimited = AgentBudgetRecord(sid, agent)
    return json_response(await agent_json(ledger, unlimited, Decimal(0)))


async def _global_json(request: web.Request) -> dict[str, Any]:
    app = request.app
    ledger = app[LEDGER]
    rec, spent, period, change = await ledger.global_budget()
    apply_change(change, app[STORE], app[BUS])  # a period that just ended
    settings = app[SETTINGS]
    pressure = await ledger.pressure(None)
    return {
        "scope": "global",
        **reports.budget_json(rec.budget_usd, spent, rec.paused, rec.pause_reason, pressure),
        "period": settings.global_budget_period,
        "periodLabel": period.label if period else None,
        "periodStart": period.start if period else None,
        "periodEnd": period.end if period else None,
        "timezone": settings.budget_timezone,
    }


@routes.get("/api/budget")
async def global_budget(request: web.Request) -> web.Response:
    return json_response(await _global_json(request))


@routes.put("/api/budget")
async def set_global_budget(request: web.Request) -> web.Response:
    app = request.app
    change = await app[LEDGER].set_global_budget(await _budget_body(request))
    apply_change(change, app[STORE], app[BUS])
    return json_response(await _global_json(request))


@routes.post("/api/sessions/{id}/pause")
async def pause(request: web.Request) -> web.Response:
    rec = (await _known_session(request)).record
    return await _session_change(request, await request.app[LEDGER].pause(rec.id))


@routes.post("/api/sessions/{id}/resume")
async def resume(request: web.Request) -> web.Response:
    rec = (await _known_session(request)).record
    try:
        change = await request.app[LEDGER].resume(rec.id)
    except ResumeRefused as exc:
        raise api_error(409, str(exc)) from None
    return await _session_change(request, change)


@routes.get("/api/pricing")
async def pricing(request: web.Request) -> web.Response:
    prices = request.app[PRICES]
    return json_response({"models": [p.to_json() for p in prices], "sources": prices.sources})


@routes.get("/api/pricing/{model:.+}")
async def pricing_model(request: web.Request) -> web.Response:
    """The price the proxy charges the model: on ``?route=`` (its provider and local
    flag), or ``?provider=`` and ``?local=``; the same function the accountant asks."""
    model = request.match_info["model"]
    query = request.query
    local = query.get("local")
    if local is not None and local.lower() not in ("true", "false", "1", "0"):
        raise api_error(400, "local must be true or false")
    try:
        price, asked = price_files.lookup(
            request.app[PRICES],
            request.app[SETTINGS],
            model,
            route=query.get("route"),
            provider=query.get("provider"),
            local=None if local is None else local.lower() in ("true", "1"),
        )
    except PricingError as exc:
        raise api_error(400, str(exc)) from None
    if price is None:
        raise api_error(404, f"no price for model {model!r} (its cost is recorded as unknown)")
    return json_response({**price.to_json(), "query": asked})


@routes.post("/api/pricing/reload")
async def pricing_reload(request: web.Request) -> web.Response:
    """Read the price files again (the stored update, the pricing file); as SIGHUP."""
    app = request.app
    try:
        table = await price_files.reload_into(app[PRICES], app[SETTINGS])
    except PricingError as exc:
        raise api_error(409, f"{exc}; the prices in use are unchanged") from None
    return json_response({"reloaded": True, "models": len(table), "sources": table.sources})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
