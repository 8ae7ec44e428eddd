"""The live dashboard page: one self-contained HTML file (no build step, no CDN), served as is.

The page's only script and style are inline; the Content-Security-Policy allows exactly
those (by hash) and requests to this origin, so nothing else can run even if a session
id or model name ever reached the page as markup. Without the admin token (or with a
wrong one) ``/`` answers :func:`token_page` instead: how to pass it (docs/reference.md §8).
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


_TOKEN_STYLE = (
    "body{margin:0;font:15px/1.5 system-ui,sans-serif;background:#f6f7f9;color:#1d2330}"
    "main{max-width:560px;margin:12vh auto;padding:24px;background:#fff;border:1px solid #e3e6ec;"
    "border-radius:10px}h1{font-size:20px;margin:0 0 12px}code{background:#eef2fb;padding:1px 5px;"
    "border-radius:4px}form{display:flex;gap:8px;margin-top:16px;flex-wrap:wrap}"
    "input{flex:1;min-width:180px;font:inherit;padding:6px 8px}"
    "button{font:inherit;padding:6px 14px}"
)
_TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">
<title>spendgate: admin token needed</title><style>{style}</style></head>
<body><main id="token-needed">
<h1>{title}</h1>
<p>This proxy has an admin token (<code>SPENDGATE_ADMIN_TOKEN</code>, or <code>admin_token</code>
in its TOML file), and the dashboard needs it. Open the dashboard with the token in the
address: <code>/?token=&lt;your admin token&gt;</code>, or enter it here.</p>
<form method="get" action="/"><input type="password" name="token" autocomplete="off"
aria-label="admin token" placeholder="admin token" required><button type="submit">Open the
dashboard</button></form>
<p>The API takes it as <code>Authorization: Bearer &lt;token&gt;</code>.</p>
</main></body></html>
"""


@cache
def _token_page(wrong: bool) -> bytes:
    title = "That admin token is wrong" if wrong else "This dashboard needs the admin token"
    return _TOKEN_PAGE.format(style=_TOKEN_STYLE, title=title).encode()


def token_page(wrong: bool) -> web.Response:
    """The 401 a browser gets at ``/`` without the right token: an HTML page saying how to
    pass it (``?token=``), with a form that does, instead of the API's JSON error. It echoes
    nothing from the request."""
    csp = (
        f"default-src 'none'; style-src {_hash(_TOKEN_STYLE.encode())}; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )
    return web.Response(
        status=401,
        body=_token_page(wrong),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
