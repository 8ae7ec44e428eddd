"""The ``/api`` routes (docs/reference.md §8): sessions, cost summaries, messages, export,
budgets, prices."""

from __future__ import annotations

import csv
import io
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spendgate import reports
from spendgate.accounting import apply_change
from spendgate.budgets import BudgetLedger, Change
from spendgate.keys import BUS, LEDGER, PRICES, REGISTRY, STORE
from spendgate.records import EXPORT_COLUMNS, SessionRecord
from spendgate.routing import valid_id

routes = web.RouteTableDef()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def api_error(status: int, message: str) -> web.HTTPException:
    text = orjson.dumps({"error": {"message": message, "status": status}}).decode()
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 404: web.HTTPNotFound}[status]
    return cls(text=text, content_type="application/json")


def session_json(ledger: BudgetLedger, rec: SessionRecord) -> dict[str, Any]:
    return reports.session_json(rec, ledger.spent(rec.id))


def _session_id(request: web.Request) -> str:
    sid = request.match_info["id"]
    if not valid_id(sid):
        raise api_error(400, f"invalid session id {sid[:40]!r}")
    return sid


def _known_session(request: web.Request) -> SessionRecord:
    sid = _session_id(request)
    rec = request.app[LEDGER].session(sid)
    if rec is None:
        raise api_error(404, f"unknown session {sid!r}")
    return rec


@routes.get("/api/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    sessions = await reports.sessions_list(request.app[STORE], request.app[LEDGER].spent)
    return json_response({"sessions": sessions})


@routes.get("/api/sessions/{id}/cost")
async def session_cost(request: web.Request) -> web.Response:
    rec = _known_session(request)
    app = request.app
    spent = app[LEDGER].spent(rec.id)
    return json_response(await reports.session_summary(app[STORE], app[PRICES], rec, spent))


@routes.get("/api/sessions/{id}/messages")
async def session_messages(request: web.Request) -> web.Response:
    rec = _known_session(request)
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
    rec = _known_session(request)
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
        writer.writerow(EXPORT_COLUMNS)
        async for m in store.iter_messages(rec.id):
            writer.writerow(m.csv_cells())
            if buf.tell() > 1 << 16:
                await resp.write(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
        await resp.write(buf.getvalue().encode())
    else:
        sep = b"["
        async for m in store.iter_messages(rec.id):
            await resp.write(sep + orjson.dumps(m.to_json()))
            sep = b","
        await resp.write(b"[]" if sep == b"[" else b"]")
    await resp.write_eof()
    return resp


async def _session_change(request: web.Request, change: Change) -> web.Response:
    app = request.app
    apply_change(change, app[STORE], app[BUS])
    ledger = app[LEDGER]
    rec = ledger.session(_session_id(request))
    assert rec is not None
    return json_response(session_json(ledger, rec))


@routes.put("/api/sessions/{id}/budget")
async def set_budget(request: web.Request) -> web.Response:
    sid = _session_id(request)
    try:
        body = orjson.loads(await request.read())
        raw = body["budgetUsd"]
        budget = None if raw is None else Decimal(str(raw))
        if budget is not None and (not budget.is_finite() or budget < 0 or isinstance(raw, bool)):
            raise ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, InvalidOperation):
        raise api_error(
            400, 'body must be {"budgetUsd": <USD ≥ 0, or null for unlimited>}'
        ) from None
    change = await request.app[LEDGER].set_budget(sid, budget)
    return await _session_change(request, change)


@routes.post("/api/sessions/{id}/pause")
async def pause(request: web.Request) -> web.Response:
    rec = _known_session(request)
    return await _session_change(request, await request.app[LEDGER].pause(rec.id))


@routes.post("/api/sessions/{id}/resume")
async def resume(request: web.Request) -> web.Response:
    rec = _known_session(request)
    return await _session_change(request, await request.app[LEDGER].resume(rec.id))


@routes.get("/api/pricing")
async def pricing(request: web.Request) -> web.Response:
    prices = request.app[PRICES]
    return json_response({"models": [p.to_json() for p in prices]})


@routes.get("/api/pricing/{model:.+}")
async def pricing_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    price = request.app[PRICES].resolve(model)
    if price is None:
        raise api_error(404, f"no price for model {model!r}")
    return json_response(price.to_json())


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
