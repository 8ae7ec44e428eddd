"""``make_app(settings)``: wires the parts into AppKeys, routes and cleanup contexts."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry

from spendgate import api, dashboard, event_stream
from spendgate.accounting import Accountant
from spendgate.budgets import LedgerUnavailable
from spendgate.keys import (
    BUS,
    LEDGER,
    METRICS,
    PRICES,
    PROXY,
    REGISTRY,
    SETTINGS,
    STORE,
    WEBHOOKS,
)
from spendgate.ledger_factory import check as check_shared
from spendgate.ledger_factory import open_backends
from spendgate.metrics import Metrics
from spendgate.price_files import reload_into, settings_table
from spendgate.pricing import PricingError
from spendgate.proxy import ProxyHandler
from spendgate.routing import Router, build_routes
from spendgate.settings import Settings
from spendgate.store_factory import describe, make_store
from spendgate.webhooks import Webhooks

log = logging.getLogger("spendgate")


def _usd(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = Metrics(
        app[REGISTRY],
        session_labels=settings.metrics_session_labels,
        max_models=settings.metrics_max_models,
    )
    check_shared(settings)  # before the store: a refused setup creates no file
    store = make_store(
        settings,
        on_drop=metrics.store_dropped.inc,
        on_reject=metrics.store_rejected.inc,
        on_error=metrics.store_write_errors.inc,
    )
    await store.open()  # StoreOpenError: cli.cmd_serve says why in one line
    backends = None
    try:
        backends = await open_backends(settings, store)  # SharedSetupError: one line
        ledger, bus = backends.ledger, backends.bus
        metrics.bind_gauges(
            lambda: ledger.paused_count,
            lambda: bus.subscriber_count,
            lambda: store.queue_depth,
            budgets=ledger.budgets,
        )
        prices = settings_table(settings)  # bundled, the stored update, the pricing file
        metrics.bind_prices(prices)
        acct = Accountant(
            prices,
            ledger,
            store,
            bus,
            metrics,
            live_interval_ms=settings.live_interval_ms,
            reserve_output_tokens=settings.reserve_output_tokens,
            admission_wait_s=settings.admission_wait_s,
            unpriced_models=settings.unpriced_models,
        )
        client = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        router = Router(build_routes(settings), settings.agent_headers)
        app[STORE], app[LEDGER], app[BUS], app[PRICES], app[METRICS] = (
            store,
            ledger,
            bus,
            prices,
            metrics,
        )
        app[PROXY].attach(router, acct, client)
        log.info("database %s, %d routes", describe(settings), len(router.routes))
    except BaseException:  # a failed or interrupted start-up (SIGTERM) closes the store too
        if backends is not None:
            await backends.bus.close()
            await backends.close()
        await store.close()
        raise
    if settings.webhook_url:  # docs/reference.md §7 "Webhook"
        counted = metrics.webhook_alerts.labels
        app[WEBHOOKS] = webhooks = Webhooks(
            settings.webhook_url, settings.webhook_events, lambda o: counted(o).inc()
        )
        await webhooks.start(bus)
    _watch_sighup(app)
    try:
        yield
    finally:
        _unwatch_sighup(app)
        if WEBHOOKS in app:
            await app[WEBHOOKS].close()
        await client.close()
        await acct.drain()  # settles sent as their responses went, before the ledger closes
        await backends.close()
        await store.close()


_HUP_APPS: list[web.Application] = []
"""Running apps whose prices a SIGHUP reloads (one handler for the process)."""
_RELOADS: set[asyncio.Task[None]] = set()


def _watch_sighup(app: web.Application) -> None:
    """SIGHUP reloads the prices (docs/reference.md §4), where the platform and the
    thread allow a signal handler (POSIX, the main thread); else only the API does."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None or threading.current_thread() is not threading.main_thread():
        return
    if not _HUP_APPS:
        try:
            asyncio.get_running_loop().add_signal_handler(hup, _sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return
    _HUP_APPS.append(app)


def _unwatch_sighup(app: web.Application) -> None:
    if app not in _HUP_APPS:
        return
    _HUP_APPS.remove(app)
    if not _HUP_APPS:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def _sighup() -> None:
    for app in _HUP_APPS:
        task = asyncio.ensure_future(_reload_prices(app))
        _RELOADS.add(task)
        task.add_done_callback(_RELOADS.discard)


async def _reload_prices(app: web.Application) -> None:
    try:
        table = await reload_into(app[PRICES], app[SETTINGS])
    except PricingError as exc:
        log.error("SIGHUP: prices not reloaded, the ones in use stay: %s", exc)
    except Exception:
        log.exception("SIGHUP: prices not reloaded, the ones in use stay")
    else:
        log.info("SIGHUP: prices reloaded (%d models)", len(table))


async def _close_subscribers(app: web.Application) -> None:
    if WEBHOOKS in app:  # first: it is a subscriber that would subscribe again
        await app[WEBHOOKS].close()
    if BUS in app:
        await app[BUS].close()


def _guarded(
    handler: Handler,
    token: str,
    query_token: bool,
    refused: Callable[[bool], web.StreamResponse] | None = None,
) -> Handler:
    """``handler`` behind the admin token (compared in constant time).

    A wrapper on the admin routes rather than a middleware, so proxied requests, the
    hot path, run no auth code at all. ``refused`` (called with whether a token was
    given) answers instead of the API's JSON 401: the dashboard's page that says how to
    pass the token.
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else ""
        if not given and query_token:
            given = request.query.get("token", "")  # EventSource and links can't set headers
        if not hmac.compare_digest(given.encode(), token.encode()):
            if refused is not None:
                return refused(bool(given))
            raise api.api_error(
                401, "missing or wrong admin token: send Authorization: Bearer <token>"
            )
        return await handler(request)

    return guarded


def _ledger_guard(handler: Handler) -> Handler:
    """An /api handler whose shared ledger cannot be reached answers 503 in the API's
    error shape (docs/reference.md §6 "Several replicas"), not a 500."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except LedgerUnavailable as exc:
            raise api.api_error(503, str(exc)) from None

    return guarded


def _add_admin_routes(app: web.Application, settings: Settings) -> None:
    """The API, the event stream, the dashboard and /metrics, guarded where
    docs/reference.md §8 says."""
    token = settings.admin_token
    table = [
        *(r for r in api.routes if isinstance(r, web.RouteDef)),
        web.get("/api/events", event_stream.events),
        web.get("/", dashboard.page),
    ]
    for r in table:
        guard = r.path.startswith("/api/") or r.path == "/"
        guard = guard or (r.path == "/metrics" and settings.metrics_require_token)
        handler = r.handler
        if r.path.startswith("/api/"):
            handler = _ledger_guard(handler)
        if token and guard:
            page = r.path == "/"
            handler = _guarded(
                handler,
                token,
                query_token=page or r.path == "/api/events",
                refused=dashboard.token_page if page else None,
            )
        web.RouteDef(r.method, r.path, handler, r.kwargs).register(app.router)


def _cors_middleware(origins: list[str]) -> Middleware:
    """CORS for /api, only for the configured origins (off by default)."""
    allowed = set(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            not request.path.startswith("/api/")
            or origin is None
            or (origin not in allowed and "*" not in allowed)
        ):
            return await handler(request)
        if request.method == "OPTIONS":
            resp: web.StreamResponse = web.Response(status=204)
        else:
            resp = await handler(request)
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Last-Event-ID"
        resp.headers["Access-Control-Allow-Methods"] = "GET, PUT, POST, OPTIONS"
        resp.headers["Vary"] = "Origin"
        return resp

    return cors


def make_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    middlewares = [_cors_middleware(settings.cors_origins)] if settings.cors_origins else []
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes)
    app[SETTINGS] = settings
    app[REGISTRY] = registry if registry is not None else CollectorRegistry()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_close_subscribers)
    _add_admin_routes(app, settings)
    app[PROXY] = proxy = ProxyHandler(settings)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
