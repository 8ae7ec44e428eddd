"""The live dashboard page: one self-contained HTML file, served as is."""

from __future__ import annotations

from importlib import resources

from aiohttp import web


async def page(request: web.Request) -> web.Response:
    html = resources.files(__package__).joinpath("index.html").read_bytes()
    return web.Response(body=html, content_type="text/html", charset="utf-8")
