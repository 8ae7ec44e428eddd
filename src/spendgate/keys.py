"""Typed application state (aiohttp ``AppKey``s), shared by app, api and sse modules."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from spendgate.accounting import Accountant
from spendgate.proxy import ProxyHandler
from spendgate.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
ACCOUNTANT = web.AppKey("accountant", Accountant)
PROXY = web.AppKey("proxy", ProxyHandler)
