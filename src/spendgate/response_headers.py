"""Optional response headers (``SPENDGATE_RESPONSE_HEADERS``, docs/reference.md §1
"Response headers"): the row's message id on every proxied response, and the row's cost
on the ones whose body is held until it is priced (not streamed).

A streamed response's headers leave before its first byte, long before its usage is
known, so a stream carries the id only; its cost is in the ``token.usage`` event of that
``messageId`` and in ``GET /api/sessions/{id}/messages``.
"""

from __future__ import annotations

from aiohttp import web

from spendgate.records import MessageRecord

MESSAGE_ID = "X-Spendgate-Message-Id"
COST_USD = "X-Spendgate-Cost-Usd"


def holdable(content_type: str) -> bool:
    """A body worth holding to price it: JSON (``application/json``, ``...+json``). Not
    any other type of unknown length, which may be a stream the request did not announce
    (Bedrock's binary event stream): holding it would stop it streaming."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def add_id(resp: web.StreamResponse, message_id: str) -> None:
    """Before a stream's headers go out."""
    resp.headers[MESSAGE_ID] = message_id


def add_row(resp: web.StreamResponse, rec: MessageRecord) -> None:
    """On a response not sent yet (a held body, or spendgate's own 502/504): the id, and
    the cost when it is known (absent for a model with no price)."""
    resp.headers[MESSAGE_ID] = rec.id
    if rec.cost_usd is not None:
        resp.headers[COST_USD] = f"{rec.cost_usd:f}"
