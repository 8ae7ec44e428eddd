"""A fast OpenAI-style upstream for the benchmark: pre-encoded bytes, no parsing.

``POST .../chat/completions`` answers a ``chat.completion`` JSON body with usage, or,
when the request body says ``"stream": true``, 64 SSE content chunks, a usage-only
chunk and ``data: [DONE]`` (with ``include_usage`` requested, the content chunks carry
``"usage":null`` as OpenAI's do). There is no artificial delay unless ``--chunk-delay`` (or a
request's ``X-Bench-Chunk-Delay`` header) asks for a pause before each chunk, which
keeps streams open for the open-streams test.

Faults, for the soak test (bench/soak.py), only when a request's ``X-Bench-Fault`` header
asks for one (``kind[:arg]``): ``500`` / ``429`` answer an OpenAI-style error JSON with that
status; ``hang:S`` waits S seconds before answering; ``reset:N`` sends N stream chunks (or,
non-streaming, nothing) then resets the TCP connection (RST); ``cut:N`` sends the headers
and N bytes of the JSON body (whose Content-Length promises more), then resets;
``stall:N:S`` sends N stream chunks, then goes silent for S seconds.

    python -m bench.fake_upstream --port 9001 [--chunk-delay 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import struct

import orjson
from aiohttp import web

MODEL = "gpt-4o-mini-2024-07-18"
CHUNKS = 64
PROMPT_TOKENS = 42
RESET_GRACE_S = 0.2
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_chunks(n: int = CHUNKS, usage_null: bool = False) -> list[bytes]:
    """n content chunks, then the usage-only chunk and [DONE], each one SSE event.

    ``usage_null``: every content chunk carries ``"usage":null``, as OpenAI's do when the
    request set ``stream_options.include_usage``.
    """
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000}
    out = []
    for i in range(n):
        delta: dict[str, str] = {"content": f"token{i} "}
        if i == 0:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == n - 1 else None}
        chunk = {**base, "model": MODEL, "choices": [choice]}
        if usage_null:
            chunk["usage"] = None
        out.append(_sse(chunk))
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": 42 + n}
    out.append(_sse({**base, "model": MODEL, "choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


def completion_body(n: int = CHUNKS) -> bytes:
    text = "".join(f"token{i} " for i in range(n))
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": n,
                "total_tokens": PROMPT_TOKENS + n,
            },
        }
    )


def error_body(status: int) -> bytes:
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    message = f"bench fault: upstream answered {status}"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


async def reset(request: web.Request) -> None:
    """Send what is buffered, then abort the connection with a TCP RST (SO_LINGER 0)."""
    transport = request.transport
    if transport is None:
        return
    for _ in range(100):  # what was written must reach the peer before the RST
        if not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.01)
    # ... and be read by it: a RST discards what the peer's kernel holds unread.
    await asyncio.sleep(RESET_GRACE_S)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def faulty(
    request: web.Request, fault: str, stream: bool, chunks: list[bytes], body: bytes
) -> web.StreamResponse:
    """The ``X-Bench-Fault`` modes (see the module docstring); ConnectionError = peer gone."""
    kind, _, arg = fault.partition(":")
    if kind in ("500", "429"):
        headers = {"Retry-After": "1"} if kind == "429" else None
        return web.Response(
            status=int(kind), body=error_body(int(kind)), content_type="application/json",
            headers=headers,
        )  # fmt: skip
    if kind == "hang":
        await asyncio.sleep(float(arg or 5))
        return web.Response(body=body, content_type="application/json")
    if kind == "cut":
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: int(arg or 40)])
        await reset(request)
        return resp
    if kind == "reset" and not stream:
        await reset(request)
        return web.Response(status=500)  # never sent: the connection is gone
    if kind in ("reset", "stall"):
        count, _, pause = arg.partition(":")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for chunk in chunks[: int(count or 3)]:
            await resp.write(chunk)
        if kind == "reset":
            await reset(request)
            return resp
        await asyncio.sleep(float(pause or 5))
        with contextlib.suppress(ConnectionError):  # the proxy gave up first (idle timeout)
            for chunk in chunks[int(count or 3) :]:
                await resp.write(chunk)
            await resp.write_eof()
        return resp
    return web.Response(status=400, text=f"unknown X-Bench-Fault {fault!r}")


def make_app(chunk_delay: float = 0.0) -> web.Application:
    plain, with_usage = stream_chunks(), stream_chunks(usage_null=True)
    body = completion_body()
    sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def handle(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        fault = request.headers.get("X-Bench-Fault")
        if fault:
            chunks = with_usage if _INCLUDE_USAGE_RE.search(data) else plain
            try:
                return await faulty(request, fault, bool(_STREAM_RE.search(data)), chunks, body)
            except ConnectionError:  # the proxy gave up on us first (its idle timeout)
                return web.Response(status=499)
        if not _STREAM_RE.search(data):
            return web.Response(body=body, content_type="application/json")
        header = request.headers.get("X-Bench-Chunk-Delay")
        delay = float(header) if header else chunk_delay
        chunks = with_usage if _INCLUDE_USAGE_RE.search(data) else plain
        resp = web.StreamResponse(headers=sse_headers)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client (or proxy) hung up
            for chunk in chunks:
                if delay:
                    await asyncio.sleep(delay)
                await resp.write(chunk)
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds before each chunk")
    args = p.parse_args()
    web.run_app(
        make_app(args.chunk_delay),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
