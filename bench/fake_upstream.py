"""A fast OpenAI-style upstream for the benchmark: pre-encoded bytes, no parsing.

``POST .../chat/completions`` answers a ``chat.completion`` JSON body with usage, or,
when the request body says ``"stream": true``, 64 SSE content chunks, a usage-only
chunk and ``data: [DONE]`` (with ``include_usage`` requested, the content chunks carry
``"usage":null`` as OpenAI's do). There is no artificial delay unless ``--chunk-delay`` (or a
request's ``X-Bench-Chunk-Delay`` header) asks for a pause before each chunk, which
keeps streams open for the open-streams test.

    python -m bench.fake_upstream --port 9001 [--chunk-delay 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import re

import orjson
from aiohttp import web

MODEL = "gpt-4o-mini-2024-07-18"
CHUNKS = 64
PROMPT_TOKENS = 42
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


def make_app(chunk_delay: float = 0.0) -> web.Application:
    plain, with_usage = stream_chunks(), stream_chunks(usage_null=True)
    body = completion_body()
    sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def handle(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        if not _STREAM_RE.search(data):
            return web.Response(body=body, content_type="application/json")
        header = request.headers.get("X-Bench-Chunk-Delay")
        delay = float(header) if header else chunk_delay
        chunks = with_usage if _INCLUDE_USAGE_RE.search(data) else plain
        resp = web.StreamResponse(headers=sse_headers)
        await resp.prepare(request)
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
