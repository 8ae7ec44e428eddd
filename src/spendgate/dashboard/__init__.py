"""The live dashboard page: one self-contained HTML file (no build step, no CDN), served as is.

The page's only script and style are inline; the Content-Security-Policy allows exactly
those (by hash) and requests to this origin, so nothing else can run even if a session
id or model name ever reached the page as markup.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def _hash(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode() + "'"


@cache
def _page() -> tuple[bytes, str]:
    html = resources.files(__package__).joinpath("index.html").read_bytes()
    found: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for tag, body in _INLINE.findall(html):
        found[tag].append(_hash(body))
    csp = (
        "default-src 'none'; "
        f"script-src {' '.join(found[b'script'])}; "
        f"style-src {' '.join(found[b'style'])}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, csp


async def page(request: web.Request) -> web.Response:
    html, csp = _page()
    return web.Response(
        body=html,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",  # the page may carry ?token=
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )
