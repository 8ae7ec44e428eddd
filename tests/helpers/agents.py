"""Real coding agents through spendgate: where the CLIs are installed, a fake upstream that
speaks what each one expects, a trap for anything that tries to leave the machine, and
the recorded exchanges in ``tests/fixtures/agents/`` (see its README).

The CLIs are installed by ``scripts/install-agents`` into ``$SPENDGATE_AGENTS_DIR`` (else
``~/.cache/spendgate-agents``), never into the repository. Every run gets a fresh ``HOME``,
fake keys, telemetry and updates switched off, and ``HTTPS_PROXY`` pointing at
:class:`NetTrap`, which refuses and notes every connection an agent tries to open beyond
the loopback proxy.

``python -m tests.helpers.agents`` runs every agent straight against the fake upstream
(no spendgate) and rewrites the fixtures from what it sent and received.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import brotli  # type: ignore[import-untyped,unused-ignore]
import orjson
import zstandard
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from spendgate.pricing import PriceTable
from tests.helpers.prices import found
from tests.paths import FIXTURES

AGENT_FIXTURES = FIXTURES / "agents"
REQUIRE_AGENTS = bool(os.environ.get("SPENDGATE_REQUIRE_AGENTS"))
"""Set by ``.ci/run`` where the installs succeeded: a missing CLI fails instead of skipping."""


def agents_dir() -> Path:
    configured = os.environ.get("SPENDGATE_AGENTS_DIR")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "spendgate-agents"


# --- the CLIs ---------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


@dataclass(frozen=True)
class Cli:
    """One installed agent: its package, the oldest release the suite accepts (what issue
    #17 measured), and where ``scripts/install-agents`` puts it."""

    name: str
    package: str
    floor: str
    relpath: str
    node: str | None = None
    """Where in the agents cache its Node is, when the machine's may be too old (Qwen Code
    0.24 needs Node 22: ``scripts/install-agents`` installs npm's ``node@22`` there)."""

    @property
    def path(self) -> Path:
        return agents_dir() / self.relpath

    def node_dir(self) -> Path | None:
        """The directory of the Node this CLI runs on, or None for the machine's."""
        return (agents_dir() / self.node).parent if self.node else None

    def version(self) -> str | None:
        if self.package == "aider-chat":
            metas = sorted((agents_dir() / "aider").glob("lib/python*/site-packages/aider_chat-*"))
            match = re.search(r"aider_chat-([^-]+)\.dist-info", metas[-1].name) if metas else None
            return match.group(1) if match else None
        meta = agents_dir() / "npm" / "node_modules" / self.package / "package.json"
        try:
            return str(orjson.loads(meta.read_bytes())["version"])
        except (OSError, KeyError, orjson.JSONDecodeError):
            return None

    def missing(self) -> str | None:
        """Why this CLI cannot run here, or None."""
        if self.node is not None and not (agents_dir() / self.node).exists():
            return f"{self.name}: its Node is not in {agents_dir()} (run scripts/install-agents)"
        if self.package != "aider-chat" and self.node is None and shutil.which("node") is None:
            return f"{self.name}: node is not installed"
        version = self.version()
        if not self.path.exists() or version is None:
            return f"{self.name} is not installed in {agents_dir()} (run scripts/install-agents)"
        if _version_tuple(version) < _version_tuple(self.floor):
            return f"{self.name} {version} is older than {self.floor} (scripts/install-agents)"
        return None


CLAUDE = Cli("claude-code", "@anthropic-ai/claude-code", "2.1.197", "npm/node_modules/.bin/claude")
CODEX = Cli("codex", "@openai/codex", "0.171.0", "npm/node_modules/.bin/codex")
OPENCODE = Cli("opencode", "opencode-ai", "1.18.33", "npm/node_modules/.bin/opencode")
AIDER = Cli("aider", "aider-chat", "0.86.2", "aider/bin/aider")
GEMINI = Cli("gemini-cli", "@google/gemini-cli", "0.61.0", "npm/node_modules/.bin/gemini")
QWEN = Cli(
    "qwen-code",
    "@qwen-code/qwen-code",
    "0.24.4",
    "npm/node_modules/.bin/qwen",
    node="node22/node_modules/.bin/node",
)
CLIS = (CLAUDE, CODEX, OPENCODE, AIDER, GEMINI, QWEN)


# --- what the fake upstream answers -------------------------------------------------------------

MARKER = "spendgate-fake-upstream-says-7f3a"
"""The text every reply carries: an agent that prints it printed what the upstream sent."""
SUB_MARKER = "spendgate-sub-agent-result-91c2"
SUB_PROMPT = "Reply with the word probe. (spendgate sub-agent test)"

# Usage the fake reports, per wire format, in the provider's terms; and the same in
# spendgate's terms (input includes cache reads and writes; output includes reasoning).
ANTHROPIC_USAGE = {
    "input_tokens": 90,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 30,
    "output_tokens": 12,
}
RESPONSES_USAGE = {
    "input_tokens": 120,
    "input_tokens_details": {"cached_tokens": 40},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 4},
    "total_tokens": 132,
}
CHAT_USAGE = {
    "prompt_tokens": 110,
    "completion_tokens": 11,
    "total_tokens": 121,
    "prompt_tokens_details": {"cached_tokens": 0},
}
GEMINI_USAGE = {
    "promptTokenCount": 100,
    "candidatesTokenCount": 10,
    "cachedContentTokenCount": 20,
    "thoughtsTokenCount": 3,
    "totalTokenCount": 113,
}


@dataclass(frozen=True)
class Tokens:
    """A row's numbers as spendgate should store them."""

    input: int
    output: int
    cached: int = 0
    reasoning: int = 0

    def cost(self, prices: PriceTable, model: str) -> Decimal:
        """Computed here from the table's per-million prices (no tiers at these sizes)."""
        price = found(prices, model)
        assert price.input is not None and price.output is not None, model
        cached_price = price.input if price.cached_input is None else price.cached_input
        total = (
            (self.input - self.cached) * price.input
            + self.cached * cached_price
            + self.output * price.output
        )
        return total / Decimal(1_000_000)


TOKENS = {
    "anthropic": Tokens(120, 12, cached=30),
    "responses": Tokens(120, 12, cached=40, reasoning=4),
    "chat": Tokens(110, 11),
    "gemini": Tokens(100, 13, cached=20, reasoning=3),
}
"""What each wire format's fake usage must be stored as."""


@dataclass(frozen=True)
class Turn:
    """One reply: text, or a call of ``tool`` with JSON ``arguments``."""

    text: str = MARKER
    tool: str | None = None
    arguments: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "tool": self.tool, "arguments": self.arguments}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Turn:
        return cls(data["text"], data["tool"], data["arguments"])


@dataclass
class Ask:
    """A generation request the fake upstream received."""

    api: str
    """``anthropic``, ``responses``, ``chat`` or ``gemini``."""
    path: str
    headers: Mapping[str, str]
    body: dict[str, Any]
    transport: str = "http"

    @property
    def model(self) -> str:
        if self.api == "gemini":  # .../models/{model}:streamGenerateContent
            return self.path.split("?")[0].rsplit("/", 1)[-1].split(":")[0]
        return str(self.body.get("model") or "")

    def text(self) -> str:
        """Everything in the request's messages, input and contents (to recognise a turn)."""
        parts = [self.body.get(k) for k in ("messages", "input", "contents")]
        return orjson.dumps(parts).decode()

    @property
    def has_tool_result(self) -> bool:
        text = self.text()
        return any(k in text for k in ('"tool_result"', '"function_call_output"', '"tool"'))


Script = Callable[[Ask], Turn]


def plain(_: Ask) -> Turn:
    return Turn()


def _named_sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def anthropic_events(model: str, turn: Turn, n: int) -> list[dict[str, Any]]:
    start_usage = dict(ANTHROPIC_USAGE, output_tokens=1)
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": f"msg_fake{n:04d}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start_usage,
            },
        }
    ]
    if turn.tool is None:
        events += [
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": turn.text},
            },
            {"type": "content_block_stop", "index": 0},
        ]
        stop = "end_turn"
    else:
        block = {"type": "tool_use", "id": f"toolu_fake{n:04d}", "name": turn.tool, "input": {}}
        args = orjson.dumps(turn.arguments or {}).decode()
        events += [
            {"type": "content_block_start", "index": 0, "content_block": block},
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": args},
            },
            {"type": "content_block_stop", "index": 0},
        ]
        stop = "tool_use"
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]},
        },
        {"type": "message_stop"},
    ]
    return events


def anthropic_message(model: str, turn: Turn, n: int) -> dict[str, Any]:
    return {
        "id": f"msg_fake{n:04d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": turn.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }


def responses_events(
    model: str, turn: Turn, n: int, *, prewarm: bool = False
) -> list[dict[str, Any]]:
    """A Responses API stream; ``prewarm`` (a ``generate: false`` request, as Codex sends first
    on a WebSocket) is answered as Codex's own test server does: created, then completed
    with zero usage and no output."""
    rid = f"resp_fake{n:04d}"
    resp: dict[str, Any] = {
        "id": rid,
        "object": "response",
        "created_at": 1700000000,
        "status": "in_progress",
        "model": model,
        "output": [],
        "usage": None,
    }
    events: list[dict[str, Any]] = [{"type": "response.created", "response": resp}]
    if prewarm:
        zero = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        events.append(
            {"type": "response.completed", "response": dict(resp, status="completed", usage=zero)}
        )
        return _numbered(events)
    if turn.tool is None:
        iid = f"msg_fake{n:04d}"
        part = {"type": "output_text", "text": turn.text, "annotations": []}
        item: dict[str, Any] = {
            "id": iid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
        at = {"item_id": iid, "output_index": 0, "content_index": 0}
        events += [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": dict(item, status="in_progress", content=[]),
            },
            {"type": "response.content_part.added", **at, "part": dict(part, text="")},
            {"type": "response.output_text.delta", **at, "delta": turn.text},
            {"type": "response.output_text.done", **at, "text": turn.text},
            {"type": "response.content_part.done", **at, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ]
    else:
        iid = f"fc_fake{n:04d}"
        args = orjson.dumps(turn.arguments or {}).decode()
        item = {
            "id": iid,
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_fake{n:04d}",
            "name": turn.tool,
            "arguments": args,
        }
        events += [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": dict(item, status="in_progress", arguments=""),
            },
            {
                "type": "response.function_call_arguments.delta",
                "item_id": iid,
                "output_index": 0,
                "delta": args,
            },
            {
                "type": "response.function_call_arguments.done",
                "item_id": iid,
                "output_index": 0,
                "arguments": args,
            },
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ]
    done = dict(resp, status="completed", output=[item], usage=RESPONSES_USAGE)
    events.append({"type": "response.completed", "response": done})
    return _numbered(events)


def _numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": e["type"], "sequence_number": i, **e} for i, e in enumerate(events)]


def chat_events(model: str, turn: Turn, n: int, *, usage: bool) -> list[dict[str, Any]]:
    """Chat completion chunks; the usage chunk only when the request asked for it."""
    base = {
        "id": f"chatcmpl-fake{n:04d}",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
    }
    if turn.tool is None:
        delta: dict[str, Any] = {"content": turn.text}
        finish = "stop"
    else:
        call = {
            "index": 0,
            "id": f"call_fake{n:04d}",
            "type": "function",
            "function": {
                "name": turn.tool,
                "arguments": orjson.dumps(turn.arguments or {}).decode(),
            },
        }
        delta, finish = {"tool_calls": [call]}, "tool_calls"
    events = [
        dict(
            base,
            choices=[
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        ),
        dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]),
        dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]),
    ]
    if usage:
        events.append(dict(base, choices=[], usage=CHAT_USAGE))
    return events


def chat_completion(model: str, turn: Turn, n: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": turn.text}
    return {
        "id": f"chatcmpl-fake{n:04d}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": CHAT_USAGE,
    }


def gemini_response(model: str, turn: Turn, n: int) -> dict[str, Any]:
    """One ``GenerateContentResponse``: the whole reply, with the fake's usage."""
    if turn.tool is None:
        part: dict[str, Any] = {"text": turn.text}
    else:
        part = {"functionCall": {"name": turn.tool, "args": turn.arguments or {}}}
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
        ],
        "usageMetadata": GEMINI_USAGE,
        "modelVersion": model,
        "responseId": f"fake{n:04d}",
    }


def gemini_chunks(model: str, turn: Turn, n: int) -> list[dict[str, Any]]:
    """A streamed reply as Gemini sends it: the text in two chunks, each repeating usage so
    far (the prompt's count first), the last with the finish reason and final usage."""
    whole = gemini_response(model, turn, n)
    first = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "index": 0}],
        "usageMetadata": {"promptTokenCount": GEMINI_USAGE["promptTokenCount"]},
        "modelVersion": model,
        "responseId": whole["responseId"],
    }
    return [first, whole]


def openai_error(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


# --- the fake upstream -------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the fake upstream answered: what came (as the upstream saw it) and what
    went back. A WebSocket is one exchange with its frames."""

    transport: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    status: int = 0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response: bytes = b""
    frames: list[tuple[str, str]] = field(default_factory=list)
    """WebSocket text frames in order, each ``("client" | "server", text)``."""
    asks: list[Ask] = field(default_factory=list)
    turns: list[Turn | None] = field(default_factory=list)
    """Per ask, the turn answered (None: a prewarm with no generation)."""
    close_code: int | None = None


HOLD_HEADER = "x-test-hold"
"""A request carrying it waits at the fake upstream until ``AgentUpstream.release()``."""


class AgentUpstream:
    """A fake provider for all four agents on one loopback port: Anthropic Messages (JSON or
    SSE, count_tokens), the Responses API over HTTP SSE and, when ``websocket``, over a
    WebSocket, chat completions (JSON or SSE), model listings and HEAD. Paths are matched
    by their ending, so any prefix in front (spendgate's ``/s/{session}/…`` form when the
    agents talk to it directly) works. ``script`` decides each generation's turn."""

    def __init__(
        self, script: Script = plain, *, websocket: bool = True, compress: bool = False
    ) -> None:
        self.script = script
        self.websocket = websocket
        self.compress = compress
        """Encode each generation's HTTP response as the best of :data:`ENCODINGS` the
        request's ``Accept-Encoding`` offers."""
        self.paced = 0.0
        """When set, a streamed reply goes out an event (or array element) per write, this
        many seconds apart, as a real stream arrives (so a budget cut can fall inside it)."""
        self.exchanges: list[Exchange] = []
        self.held = 0
        self._hold = asyncio.Event()
        self._asks = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> AgentUpstream:
        self.server = TestServer(self.app, host="127.0.0.1", port=0)
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self.release()
        if self.server is not None:
            await self.server.close()

    def release(self) -> None:
        self._hold.set()

    def asks(self) -> list[Ask]:
        return [a for e in self.exchanges for a in e.asks]

    def _turn(self, ask: Ask) -> tuple[int, Turn]:
        self._asks += 1
        return self._asks, self.script(ask)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ex = Exchange(
            "http",
            request.method,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,
            list(request.headers.items()),
            body,
        )
        self.exchanges.append(ex)
        if HOLD_HEADER in request.headers:
            self.held += 1
            await self._hold.wait()
        path = request.path.rstrip("/")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and self.websocket and path.endswith("/responses"):
            ex.transport = "websocket"
            return await self._socket(request, ex)
        status, ctype, payload = self._answer(request.method, path, body, ex)
        headers = {}
        if self.compress and ex.asks and status == 200:
            offered = {
                e.split(";")[0].strip().lower()
                for e in request.headers.get("Accept-Encoding", "").split(",")
            }
            encoding = next((e for e in ENCODINGS if e in offered), None)
            if encoding is not None:
                payload = ENCODINGS[encoding](payload)
                headers["Content-Encoding"] = encoding
        ex.status, ex.response = status, payload
        if self.paced and ex.asks and status == 200 and not headers:
            return await self._paced(request, ex, ctype, payload)
        resp = web.Response(status=status, body=payload, content_type=ctype, headers=headers)
        ex.response_headers = [(k, resp.headers[k]) for k in ("Content-Type", *headers)]
        return resp

    async def _paced(
        self, request: web.Request, ex: Exchange, ctype: str, payload: bytes
    ) -> web.StreamResponse:
        """``payload`` an event (SSE) or element (JSON array) per write."""
        resp = web.StreamResponse(status=200)
        resp.content_type = ctype
        ex.response_headers = [("Content-Type", resp.headers["Content-Type"])]
        await resp.prepare(request)
        unit = rb".*?(?:\r\n\r\n|\n\n)" if "event-stream" in ctype else rb".*?(?=\n,\r\n)"
        for piece in re.findall(unit + rb"|.+", payload, re.DOTALL):
            if piece:
                await resp.write(piece)
                await asyncio.sleep(self.paced)
        await resp.write_eof()
        return resp

    def _answer(self, method: str, path: str, body: bytes, ex: Exchange) -> tuple[int, str, bytes]:
        if method == "HEAD":
            return 200, "text/plain", b""
        if method == "GET" and path.endswith("/models"):
            return 200, "application/json", b'{"object":"list","data":[],"has_more":false}'
        if method != "POST":
            # A GET of /v1/responses with no upgrade (spendgate without WebSocket support
            # forwards Codex's handshake like this) gets what the API answers a plain GET.
            msg = f"Invalid method for URL ({method} {path})"
            return 405, "application/json", openai_error(msg, "invalid_request_error")
        if path.endswith("/count_tokens"):
            return 200, "application/json", b'{"input_tokens":42}'
        if path.endswith(":countTokens"):
            return 200, "application/json", b'{"totalTokens":42}'
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return (
                400,
                "application/json",
                openai_error("body is not JSON", "invalid_request_error"),
            )
        api = next((api for suffix, api in _APIS if path.endswith(suffix)), None)
        if path.endswith((":generateContent", ":streamGenerateContent")):
            api = "gemini"
        if api is None or not isinstance(data, dict):
            return 404, "application/json", openai_error(f"no fake for {path}", "not_found")
        ask = Ask(api, ex.path, CIMultiDict(ex.headers), data)
        n, turn = self._turn(ask)
        ex.asks.append(ask)
        ex.turns.append(turn)
        model, stream = ask.model, data.get("stream") is True
        if api == "gemini":
            if path.endswith(":generateContent"):
                return 200, "application/json", orjson.dumps(gemini_response(model, turn, n))
            chunks = [orjson.dumps(c) for c in gemini_chunks(model, turn, n)]
            if "alt=sse" in ex.query:
                return (
                    200,
                    "text/event-stream",
                    b"".join(b"data: " + c + b"\r\n\r\n" for c in chunks),
                )
            return 200, "application/json", b"[" + b"\n,\r\n".join(chunks) + b"\n]"
        if api == "anthropic":
            if stream:
                return 200, "text/event-stream", _named_sse(anthropic_events(model, turn, n))
            return 200, "application/json", orjson.dumps(anthropic_message(model, turn, n))
        if api == "responses":
            return 200, "text/event-stream", _named_sse(responses_events(model, turn, n))
        if stream:
            options = data.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = [
                b"data: " + orjson.dumps(e) + b"\n\n"
                for e in chat_events(model, turn, n, usage=usage)
            ]
            return 200, "text/event-stream", b"".join(chunks) + b"data: [DONE]\n\n"
        return 200, "application/json", orjson.dumps(chat_completion(model, turn, n))

    async def _socket(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        ex.status = 101
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            ex.frames.append(("client", msg.data))
            try:
                data = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict) or data.get("type") != "response.create":
                continue
            ask = Ask("responses", ex.path, CIMultiDict(ex.headers), data, "websocket")
            prewarm = data.get("generate") is False
            n, turn = self._turn(ask)
            ex.asks.append(ask)
            ex.turns.append(None if prewarm else turn)
            for event in responses_events(ask.model, turn, n, prewarm=prewarm):
                text = orjson.dumps(event).decode()
                ex.frames.append(("server", text))
                await ws.send_str(text)
        ex.close_code = ws.close_code
        return ws


ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "gzip": gzip.compress,
}
"""What a compressing fake upstream prefers, best first (the agents offer br, zstd, gzip)."""

_APIS = (
    ("/messages", "anthropic"),
    ("/responses", "responses"),
    ("/chat/completions", "chat"),
)


# --- the net trap -----------------------------------------------------------------------------


class NetTrap:
    """What ``HTTPS_PROXY``/``HTTP_PROXY`` point at: every connection an agent tries to open
    to anything but the loopback proxy arrives here, is noted and refused (403)."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> NetTrap:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            if len(parts) >= 2:
                self.targets.append(parts[1])
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    def hosts(self) -> set[str]:
        """The hosts tried (``api.openai.com`` from ``api.openai.com:443`` or a URL)."""
        out = set()
        for target in self.targets:
            host = re.sub(r"^[a-z]+://", "", target).split("/", 1)[0]
            out.add(host.rsplit(":", 1)[0] if re.search(r":\d+$", host) else host)
        return out

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- running an agent ---------------------------------------------------------------------------

FAKE_OPENAI_KEY = "sk-spendgate-test-openai-0000"
FAKE_ANTHROPIC_KEY = "sk-ant-spendgate-test-0000"
PROMPT = "Reply with the single word pong."


@dataclass
class Run:
    argv: list[str]
    returncode: int | None
    """None: killed (timed out, or stopped by the test)."""
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv[:4])} ... -> {self.returncode} in {self.seconds:.1f} s\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


@dataclass
class Sandbox:
    """A fresh ``HOME`` (with a work directory) and the environment every agent runs in."""

    home: Path
    trap: NetTrap

    @property
    def work(self) -> Path:
        return self.home / "work"

    def env(self, **extra: str) -> dict[str, str]:
        node = shutil.which("node")
        path = [str(Path(node).parent)] if node else []
        env = {
            "PATH": os.pathsep.join([*path, "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "TMPDIR": str(self.home / "tmp"),
            "TERM": "dumb",
            "NO_COLOR": "1",
            "LANG": "C.UTF-8",
            "CI": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = self.trap.url
        env.update(extra)
        return env


@contextlib.asynccontextmanager
async def sandbox() -> AsyncIterator[Sandbox]:
    trap = await NetTrap().start()
    with tempfile.TemporaryDirectory(prefix="spendgate-agent-") as tmp:
        home = Path(tmp)
        for sub in ("work", "tmp", ".config", ".cache"):
            (home / sub).mkdir()
        try:
            yield Sandbox(home, trap)
        finally:
            await trap.close()


async def run(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    timeout: float = 120.0,
    until: Callable[[], bool] | None = None,
) -> Run:
    """Run an agent to its end (or ``timeout``, or until ``until()`` holds: then it is
    stopped) with no terminal and an empty stdin; its whole process group is ended."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    comm = asyncio.ensure_future(proc.communicate())
    deadline = started + timeout
    killed = False
    while not comm.done():
        if time.monotonic() > deadline or (until is not None and until()):
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        await asyncio.wait([comm], timeout=0.05)
    out, err = await comm
    return Run(
        argv,
        None if killed else proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        time.monotonic() - started,
    )


def claude_command(
    box: Sandbox, base_url: str, prompt: str = PROMPT
) -> tuple[list[str], dict[str, str]]:
    env = box.env(
        ANTHROPIC_BASE_URL=base_url,
        ANTHROPIC_API_KEY=FAKE_ANTHROPIC_KEY,
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    return [str(CLAUDE.path), "-p", prompt], env


CODEX_MODEL = "gpt-5.5"
"""Codex's own default (gpt-6.2-sol in 0.171.0) has no price in the bundled table."""


def codex_command(
    box: Sandbox,
    base_url: str | None,
    prompt: str = PROMPT,
    *,
    model: str = CODEX_MODEL,
    **env: str,
) -> tuple[list[str], dict[str, str]]:
    """``codex exec``; ``base_url`` as ``-c openai_base_url=…`` (None: none given, e.g. for a
    config.toml provider block or the ignored ``OPENAI_BASE_URL``)."""
    argv = [str(CODEX.path), "exec", "--skip-git-repo-check", "-m", model]
    if base_url is not None:
        argv += ["-c", f'openai_base_url="{base_url}"']
    codex_home = box.home / ".codex"
    codex_home.mkdir(exist_ok=True)
    return [*argv, prompt], box.env(
        OPENAI_API_KEY=FAKE_OPENAI_KEY, CODEX_HOME=str(codex_home), **env
    )


def codex_provider_block(base_url: str, model: str = CODEX_MODEL) -> str:
    """The config.toml the README shows: a provider of its own, plain HTTPS."""
    return (
        f'model = "{model}"\n'
        'model_provider = "spendgate"\n\n'
        "[model_providers.spendgate]\n"
        'name = "spendgate"\n'
        f'base_url = "{base_url}"\n'
        'env_key = "OPENAI_API_KEY"\n'
        'wire_api = "responses"\n'
    )


OPENCODE_MODEL = "gpt-5.5"
OPENCODE_SMALL_MODEL = "gpt-5.4-nano"
"""What OpenCode 1.18 picks for titles with the openai provider."""


def opencode_config(base_url: str) -> str:
    """The README's OpenCode config: the built-in openai provider with another baseURL."""
    return json.dumps(
        {
            "$schema": "https://opencode.ai/config.json",
            "autoupdate": False,
            "share": "disabled",
            "provider": {"openai": {"options": {"baseURL": base_url, "apiKey": FAKE_OPENAI_KEY}}},
            "model": f"openai/{OPENCODE_MODEL}",
        }
    )


def opencode_command(
    box: Sandbox, base_url: str, prompt: str = PROMPT
) -> tuple[list[str], dict[str, str]]:
    env = box.env(
        OPENCODE_CONFIG_CONTENT=opencode_config(base_url),
        OPENCODE_DISABLE_AUTOUPDATE="1",
        OPENCODE_DISABLE_MODELS_FETCH="1",
        OPENCODE_DISABLE_LSP_DOWNLOAD="1",
        OPENCODE_DISABLE_SHARE="1",
        OPENCODE_DISABLE_CLAUDE_CODE="1",
    )
    return [str(OPENCODE.path), "run", prompt], env


AIDER_OPENAI_MODEL = "gpt-5.5"
AIDER_ANTHROPIC_MODEL = "claude-sonnet-4-5"
AIDER_FLAGS = [
    "--yes-always",
    "--no-git",
    "--no-auto-commits",
    "--no-check-update",
    "--no-analytics",
    "--no-show-model-warnings",
    "--no-show-release-notes",
    "--no-pretty",
    "--no-fancy-input",
]


def aider_command(
    box: Sandbox, *args: str, prompt: str = PROMPT, **env: str
) -> tuple[list[str], dict[str, str]]:
    argv = [str(AIDER.path), "--message", prompt, *AIDER_FLAGS, *args]
    return argv, box.env(LITELLM_LOCAL_MODEL_COST_MAP="True", **env)


def aider_openai(box: Sandbox, base_url: str) -> tuple[list[str], dict[str, str]]:
    return aider_command(
        box,
        "--openai-api-base",
        base_url,
        "--openai-api-key",
        FAKE_OPENAI_KEY,
        "--model",
        f"openai/{AIDER_OPENAI_MODEL}",
    )


def aider_anthropic(box: Sandbox, base_url: str) -> tuple[list[str], dict[str, str]]:
    return aider_command(
        box,
        "--model",
        f"anthropic/{AIDER_ANTHROPIC_MODEL}",
        ANTHROPIC_API_BASE=base_url,
        ANTHROPIC_API_KEY=FAKE_ANTHROPIC_KEY,
    )


GEMINI_MODEL = "gemini-2.5-flash"
"""Gemini CLI 0.61's default (auto routing between gemini-3 models) is given ``-m`` a
priced model, as a user with a budget would."""
FAKE_GEMINI_KEY = "AIzaSy-spendgate-test-gemini-0000"
GEMINI_SETTINGS = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
"""The README's ``~/.gemini/settings.json``: without it ``GOOGLE_GEMINI_BASE_URL`` selects
the ``gateway`` auth type, which Gemini CLI's own start-up check refuses (exit 41)."""
GEMINI_QUIET = {
    "telemetry": {"enabled": False},
    "privacy": {"usageStatisticsEnabled": False},
    "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
}


def gemini_command(
    box: Sandbox,
    base_url: str,
    prompt: str = PROMPT,
    *,
    settings: bool = True,
    **env: str,
) -> tuple[list[str], dict[str, str]]:
    """``gemini -p``: the settings file (unless ``settings`` is False) and the variables the
    README names (``GOOGLE_GEMINI_BASE_URL``, ``GEMINI_CLI_TRUST_WORKSPACE`` for a run with
    no one to answer the trust prompt)."""
    home = box.home / ".gemini"
    home.mkdir(exist_ok=True)
    config = {**GEMINI_QUIET, **(GEMINI_SETTINGS if settings else {})}
    (home / "settings.json").write_text(json.dumps(config))
    argv = [str(GEMINI.path), "-m", GEMINI_MODEL, "-p", prompt]
    return argv, box.env(
        GEMINI_API_KEY=FAKE_GEMINI_KEY,
        GOOGLE_GEMINI_BASE_URL=base_url,
        GEMINI_CLI_TRUST_WORKSPACE="true",
        **env,
    )


QWEN_MODEL = "qwen3-coder-plus"
"""What Qwen Code users run through an OpenAI-compatible endpoint (Alibaba's Model
Studio); priced by the shipped overrides file."""


def qwen_command(
    box: Sandbox, base_url: str, prompt: str = PROMPT
) -> tuple[list[str], dict[str, str]]:
    """``qwen -p`` with ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` / ``OPENAI_MODEL``, on the
    Node in the agents cache; telemetry off in ``~/.qwen/settings.json`` (else it reports
    to an Alibaba RUM host). The proxy variables point at the trap, as for every agent:
    Qwen Code 0.24 honours ``NO_PROXY`` for loopback (0.15 did not: clear them there)."""
    home = box.home / ".qwen"
    home.mkdir(exist_ok=True)
    (home / "settings.json").write_text(
        json.dumps(
            {
                "privacy": {"usageStatisticsEnabled": False},
                "telemetry": {"enabled": False},
                "general": {"disableAutoUpdate": True},
            }
        )
    )
    env = box.env(OPENAI_BASE_URL=base_url, OPENAI_API_KEY=FAKE_OPENAI_KEY, OPENAI_MODEL=QWEN_MODEL)
    node = QWEN.node_dir()
    if node is not None:
        env["PATH"] = os.pathsep.join([str(node), env["PATH"]])
    return [str(QWEN.path), "-p", prompt], env


# --- scripts: what a multi-turn run answers ------------------------------------------------------


def claude_sub_agent(ask: Ask) -> Turn:
    """The main loop calls its Agent tool once; the sub-agent answers; then the main loop
    answers with the marker."""
    text = ask.text()
    if SUB_PROMPT in text and not ask.has_tool_result and "x-claude-code-agent-id" in ask.headers:
        return Turn(SUB_MARKER)
    if ask.has_tool_result or "tools" not in ask.body:
        return Turn()
    args = {"description": "probe", "prompt": SUB_PROMPT, "subagent_type": "general-purpose"}
    return Turn("", tool="Agent", arguments=args)


def opencode_sub_agent(ask: Ask) -> Turn:
    """As :func:`claude_sub_agent`, through OpenCode's task tool (titles get the marker)."""
    if "x-parent-session-id" in ask.headers:
        return Turn(SUB_MARKER)
    tools = ask.body.get("tools") or []
    if ask.has_tool_result or not any(t.get("name") == "task" for t in tools):
        return Turn()
    args = {"description": "probe", "prompt": SUB_PROMPT, "subagent_type": "general"}
    return Turn("", tool="task", arguments=args)


# --- fixtures --------------------------------------------------------------------------------

PROSE_CHARS = 160
"""Strings in recorded request bodies longer than this are the agents' own prompts and
tool descriptions: replaced by a filler of the same length (they are not ours to publish;
nothing spendgate reads is prose)."""
_VOLATILE_HEADERS = {"host", "content-length", "sec-websocket-key"}


def redact(value: Any) -> Any:
    """``value`` with every long string replaced by a filler of its length; a long string
    that holds a JSON document (Codex's turn metadata) is redacted inside instead."""
    if isinstance(value, str):
        if len(value) <= PROSE_CHARS:
            return value
        if value[:1] in "{[":
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.dumps(redact(orjson.loads(value))).decode()
        note = f"[{len(value)} characters of the agent's own text]"
        return note + "." * (len(value) - len(note))
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    return value


def redact_body(body: bytes) -> bytes:
    if not body:
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return orjson.dumps(redact(data), option=orjson.OPT_INDENT_2) + b"\n"


@dataclass
class Recording:
    """One scenario's exchanges as committed: ``exchanges.json`` beside numbered bodies."""

    name: str
    agent: str
    version: str
    note: str
    exchanges: list[dict[str, Any]]
    directory: Path

    def body(self, file: str | None) -> bytes:
        return b"" if file is None else (self.directory / file).read_bytes()


def write_recording(name: str, cli: Cli, note: str, exchanges: list[Exchange]) -> Path:
    directory = AGENT_FIXTURES / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    entries = []
    for i, ex in enumerate(exchanges, 1):
        entry: dict[str, Any] = {
            "transport": ex.transport,
            "method": ex.method,
            "path": ex.path + (f"?{ex.query}" if ex.query else ""),
            "headers": [f"{k}: {v}" for k, v in ex.headers if k.lower() not in _VOLATILE_HEADERS],
            "status": ex.status,
            "turns": [None if t is None else t.to_json() for t in ex.turns],
        }
        if ex.body:
            entry["body"] = f"{i:02d}.request.json"
            (directory / entry["body"]).write_bytes(redact_body(ex.body))
        if ex.transport == "websocket":
            entry["frames"] = f"{i:02d}.frames.json"
            frames = [
                {"from": side, "data": redact(orjson.loads(text))} for side, text in ex.frames
            ]
            (directory / entry["frames"]).write_bytes(
                orjson.dumps(frames, option=orjson.OPT_INDENT_2) + b"\n"
            )
        else:
            entry["response_headers"] = [f"{k}: {v}" for k, v in ex.response_headers]
            if ex.response:
                ctype = dict(ex.response_headers).get("Content-Type", "")
                ext = "sse" if "event-stream" in ctype else "json"
                entry["response"] = f"{i:02d}.response.{ext}"
                (directory / entry["response"]).write_bytes(ex.response)
        entries.append(entry)
    meta = {"agent": cli.name, "version": cli.version(), "note": note, "exchanges": entries}
    (directory / "exchanges.json").write_bytes(
        orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n"
    )
    return directory


def recordings() -> Iterator[Recording]:
    for meta_file in sorted(AGENT_FIXTURES.glob("*/exchanges.json")):
        meta = orjson.loads(meta_file.read_bytes())
        yield Recording(
            meta_file.parent.name,
            meta["agent"],
            meta["version"],
            meta["note"],
            meta["exchanges"],
            meta_file.parent,
        )


def headers_of(entry: dict[str, Any], key: str = "headers") -> list[tuple[str, str]]:
    pairs = (line.split(": ", 1) for line in entry.get(key, []))
    return [(k, v) for k, v in pairs]


def frames_of(recording: Recording, entry: dict[str, Any]) -> list[tuple[str, str]]:
    data = orjson.loads(recording.body(entry["frames"]))
    return [(f["from"], orjson.dumps(f["data"]).decode()) for f in data]


# --- recording (python -m tests.helpers.agents) ------------------------------------------------

SCENARIOS: dict[str, tuple[Cli, str]] = {
    "claude-code-print": (
        CLAUDE,
        "claude -p, ANTHROPIC_BASE_URL=…/anthropic (session from its header)",
    ),
    "claude-code-sub-agent": (CLAUDE, "claude -p; the main loop calls the Agent tool once"),
    "codex-websocket": (
        CODEX,
        "codex exec -c openai_base_url=…/openai/v1 against a server that speaks WebSocket",
    ),
    "codex-https": (CODEX, "codex exec with the README's config.toml provider block (plain HTTPS)"),
    "opencode-run": (OPENCODE, "opencode run, the openai provider's baseURL …/openai/v1"),
    "opencode-sub-agent": (OPENCODE, "opencode run; the main loop calls the task tool once"),
    "aider-openai": (AIDER, "aider --openai-api-base …/s/aider-openai/openai/v1"),
    "aider-anthropic": (AIDER, "aider, ANTHROPIC_API_BASE=…/s/aider-anthropic/anthropic"),
    "gemini-cli-print": (
        GEMINI,
        "gemini -p, ~/.gemini/settings.json (gemini-api-key), "
        "GOOGLE_GEMINI_BASE_URL=…/s/gemini-cli-print/gemini",
    ),
    "qwen-code-print": (
        QWEN,
        "qwen -p, OPENAI_BASE_URL=…/s/qwen-code-print/openai/v1, OPENAI_MODEL=qwen3-coder-plus",
    ),
}


async def record(name: str) -> Path:
    """Run one scenario straight against the fake upstream and write its fixture."""
    cli, note = SCENARIOS[name]
    reason = cli.missing()
    if reason:
        raise SystemExit(reason)
    script: Script = {
        "claude-code-sub-agent": claude_sub_agent,
        "opencode-sub-agent": opencode_sub_agent,
    }.get(name, plain)
    upstream = await AgentUpstream(script, websocket=name != "codex-https").start()
    base = upstream.base_url
    try:
        async with sandbox() as box:
            if cli is CLAUDE:
                argv, env = claude_command(box, f"{base}/anthropic")
            elif name == "codex-websocket":
                argv, env = codex_command(box, f"{base}/openai/v1")
            elif name == "codex-https":
                (box.home / ".codex").mkdir(exist_ok=True)
                (box.home / ".codex" / "config.toml").write_text(
                    codex_provider_block(f"{base}/openai/v1")
                )
                argv, env = codex_command(box, None)
            elif cli is OPENCODE:
                argv, env = opencode_command(box, f"{base}/openai/v1")
            elif name == "aider-openai":
                argv, env = aider_openai(box, f"{base}/s/aider-openai/openai/v1")
            elif cli is GEMINI:
                argv, env = gemini_command(box, f"{base}/s/{name}/gemini")
            elif cli is QWEN:
                argv, env = qwen_command(box, f"{base}/s/{name}/openai/v1")
            else:
                argv, env = aider_anthropic(box, f"{base}/s/aider-anthropic/anthropic")
            result = await run(argv, env, box.work)
            if result.returncode != 0 or MARKER not in result.output:
                raise SystemExit(f"{name}: the run failed\n{result.describe()}")
    finally:
        await upstream.close()
    return write_recording(name, cli, note, upstream.exchanges)


async def _record_all(names: list[str]) -> None:
    for name in names:
        print(await record(name))


if __name__ == "__main__":
    asyncio.run(_record_all(sys.argv[1:] or list(SCENARIOS)))
