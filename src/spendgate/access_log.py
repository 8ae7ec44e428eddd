"""The access log (``SPENDGATE_ACCESS_LOG``, docs/reference.md §1 "Access log"): one line
per proxied request, made from the request's row once its meter has closed, so it says
what the row says (tokens, cost, status) and the proxy handler adds nothing of its own.

No path, query string or header is logged: a key can travel in any of them (Gemini's
``?key=``). Ids are already checked (``routing.ID_RE``); the model name comes from a
client or an upstream, so anything outside a plain model id is quoted and escaped, and
cut at :data:`MAX_FIELD`: a line can never be split or forged.
"""

from __future__ import annotations

import logging
import re

import orjson

from spendgate.records import MessageRecord

log = logging.getLogger("spendgate.access")

MAX_FIELD = 128
"""Characters of a model name kept in a line."""

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")


def field(value: str | None) -> str:
    """A value as one token of a line: ``-`` for none, plain ids as they are, anything
    else as a JSON string (quoted, control characters escaped), at most MAX_FIELD long."""
    if value is None:
        return "-"
    if _PLAIN.fullmatch(value):
        return value
    cut = value[:MAX_FIELD] + ("…" if len(value) > MAX_FIELD else "")
    return orjson.dumps(cut).decode()


def line(method: str, rec: MessageRecord) -> str:
    """``POST openai chat session=run-1 agent=- model=gpt-4o status=200 in=1200 out=300
    cost=0.000307 ms=152.3 stream=false`` (cost ``-`` when unpriced; ``estimated`` and
    ``aborted`` appear only when true)."""
    # normalize: costs are quantized to 1e-10 (accounting.py), trailing zeros say nothing
    cost = "-" if rec.cost_usd is None else f"{rec.cost_usd.normalize():f}"
    text = (
        f"{field(method)} {rec.route} {rec.endpoint} session={rec.session_id} "
        f"agent={field(rec.agent_id)} model={field(rec.model)} status={rec.status} "
        f"in={rec.input_tokens} out={rec.output_tokens} cost={cost} "
        f"ms={rec.duration_ms:.1f} stream={'true' if rec.stream else 'false'}"
    )
    if rec.estimated:
        text += " estimated=true"
    if rec.aborted:
        text += " aborted=true"
    if rec.error:
        text += f" error={field(rec.error)}"
    return text


def write(method: str, rec: MessageRecord) -> None:
    log.info("%s", line(method, rec))
