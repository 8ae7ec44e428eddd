"""Typed application state (aiohttp ``AppKey``s): one key per part, so the API, the
event stream and the proxy each take the parts they use and nothing reaches them
through another part (docs/reference.md §13)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from spendgate.budgets import BudgetLedger
from spendgate.bus import EventBus
from spendgate.metrics import Metrics
from spendgate.pricing import PriceTable
from spendgate.proxy import ProxyHandler
from spendgate.settings import Settings
from spendgate.store import Store
from spendgate.webhooks import Webhooks

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
STORE = web.AppKey("store", Store)
LEDGER = web.AppKey("ledger", BudgetLedger)
BUS = web.AppKey("bus", EventBus)
PRICES = web.AppKey("prices", PriceTable)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", ProxyHandler)
"""The catch-all handler; it holds the accountant each request's meter reports to."""
WEBHOOKS = web.AppKey("webhooks", Webhooks)
"""The webhook subscriber, only when ``webhook_url`` is set."""
