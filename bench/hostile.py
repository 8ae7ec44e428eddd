"""A hostile upstream's cost to the proxy: ``python -m bench.hostile`` (~1 min).

Issue #16 measured, on the landed main, a 64 MiB SSE line with no newline costing 16.2 s
and 289 MB (quadratic re-scanning), and a 1 MB gzip body pushing the proxy to 2.15 GB
(the parser's copy inflated without a limit). This runs those inputs through the real
proxy: ``python -m spendgate serve`` with its real defaults, a fresh process per case so
its peak RSS (``VmHWM``) is that case's, in front of a hostile upstream in another
process (this file, ``serve`` mode) on loopback. Per case it reports the proxy's CPU
seconds for the request (``/proc/<pid>/stat``), its peak RSS, and the latency of
another client's ``GET /healthz`` asked every 10 ms while the hostile response flows.

Cases: an SSE content event, then one line of N MiB with no newline (sent in 64 KiB
writes), then the usage event, on the OpenAI route (``include_usage`` injected, so the
output filter sees the line too) and on the Anthropic route, for 1 and 64 MiB; a gzip
bomb (about 1 MB on the wire, 1 GiB inflated, JSON-shaped) read whole (it has a
``Content-Length``) and streamed (chunked); and a plain JSON answer for reference.

    python -m bench.hostile [--src DIR] [--bomb-mib 1024] [--json FILE]

``--src DIR`` runs the proxy from another source tree (``DIR/src``), e.g. an older
commit unpacked with ``git archive``, to measure before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson
from aiohttp import web

from bench import run as bench

MIB = 1 << 20
PIECE = b"x" * 65536
MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"


# -- the hostile upstream (``serve`` mode, its own process) ------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _bomb(mib: int) -> bytes:
    """A JSON-shaped gzip bomb: a body that starts as a chat completion, then ``mib`` MiB
    of one string (about 1,000:1)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b'{"model":"%s","usage":{"prompt_tokens":1,"completion_tokens":1},"x":"' % MODEL.encode()
    out = [c.compress(head)]
    unit = b"0" * MIB
    out += [c.compress(unit) for _ in range(mib)]
    out.append(c.flush())
    return b"".join(out)


class HostileUpstream:
    def __init__(self, bomb_mib: int) -> None:
        self.bomb = _bomb(bomb_mib)
        self.app = web.Application()
        self.app.router.add_get("/", self.health)
        self.app.router.add_post("/{tail:.*}", self.answer)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        kind, _, arg = request.headers.get("X-Hostile", "plain").partition(":")
        if kind == "plain":
            usage = {"prompt_tokens": 9, "completion_tokens": 4}
            return web.json_response({"model": MODEL, "choices": [], "usage": usage})
        if kind == "bomb":
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            if arg == "whole":
                return web.Response(body=self.bomb, headers=headers)
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            for i in range(0, len(self.bomb), 65536):
                await resp.write(self.bomb[i : i + 65536])
            await resp.write_eof()
            return resp
        route, mib = arg.split(",")
        if route == "anthropic":
            start = {
                "type": "message_start",
                "message": {"model": CLAUDE, "usage": {"input_tokens": 9, "output_tokens": 1}},
            }
            head, tail = (
                [_sse(start)],
                [_sse({"type": "message_delta", "usage": {"output_tokens": 4}})],
            )
        else:
            head = [_sse({"model": MODEL, "choices": [{"index": 0, "delta": {"content": "Hi"}}]})]
            last: dict[str, Any] = {
                "model": MODEL,
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4},
            }
            tail = [_sse(last), b"data: [DONE]\n\n"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in head:
            await resp.write(chunk)
        await resp.write(b"data: ")
        for _ in range(int(mib) * MIB // len(PIECE)):
            await resp.write(PIECE)
        await resp.write(b"\n\n")
        for chunk in tail:
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def serve(port: int, bomb_mib: int) -> None:
    web.run_app(HostileUpstream(bomb_mib).app, host=bench.HOST, port=port, print=None)


# -- the measurement ------------------------------------------------------------------------------

CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    # name, route path, X-Hostile, request body
    ("plain JSON answer (reference)", "openai/v1/chat/completions", "plain", {}),
    ("OpenAI stream, 1 MiB line", "openai/v1/chat/completions", "line:openai,1", {"stream": True}),
    (
        "OpenAI stream, 64 MiB line",
        "openai/v1/chat/completions",
        "line:openai,64",
        {"stream": True},
    ),
    ("Anthropic stream, 1 MiB line", "anthropic/v1/messages", "line:anthropic,1", {"stream": True}),
    (
        "Anthropic stream, 64 MiB line",
        "anthropic/v1/messages",
        "line:anthropic,64",
        {"stream": True},
    ),
    ("gzip bomb, read whole", "openai/v1/chat/completions", "bomb:whole", {}),
    ("gzip bomb, streamed", "openai/v1/chat/completions", "bomb:stream", {}),
]


async def start_proxy(
    tmp: Path, upstream: bench.Server, name: str, src: str | None
) -> bench.Server:
    port = bench.free_port()
    base = upstream.url.rstrip("/")
    env = {
        "SPENDGATE_HOST": bench.HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp / f"{name}.db"),
        "SPENDGATE_OPENAI_BASE_URL": base,
        "SPENDGATE_ANTHROPIC_BASE_URL": base,
    }
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve() / "src")
    argv = [sys.executable, "-m", "spendgate", "serve"]
    return await bench.start_server(name, argv, f"http://{bench.HOST}:{port}/healthz", tmp, env)


async def healthz_probe(url: str, stop: asyncio.Event, out: list[float]) -> None:
    """Another client: ``GET /healthz`` every 10 ms, each latency in ms."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            t = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
            out.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.01)


async def one_case(
    tmp: Path,
    upstream: bench.Server,
    i: int,
    case: tuple[str, str, str, dict[str, Any]],
    src: str | None,
) -> dict[str, Any]:
    name, path, hostile, extra = case
    proxy = await start_proxy(tmp, upstream, f"proxy{i}", src)
    root = proxy.url.rstrip("/")
    model = CLAUDE if path.startswith("anthropic") else MODEL
    body = {
        "model": model,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:  # warm up
            async with http.post(f"{root}/s/warm/{path}", json=body) as resp:
                await resp.read()
            rss0 = bench.status_kb(proxy.pid, "VmRSS")
            stop, lat = asyncio.Event(), list[float]()
            probe = asyncio.create_task(healthz_probe(f"{root}/healthz", stop, lat))
            await asyncio.sleep(0.2)
            cpu0, t0 = bench.cpu_seconds(proxy.pid), time.perf_counter()
            got = 0
            headers = {"X-Hostile": hostile, "Accept-Encoding": "gzip"}
            async with http.post(f"{root}/s/hostile/{path}", json=body, headers=headers) as resp:
                async for piece in resp.content.iter_any():
                    got += len(piece)
                status = resp.status
            wall, cpu = time.perf_counter() - t0, bench.cpu_seconds(proxy.pid) - cpu0
            await asyncio.sleep(0.2)
            stop.set()
            await probe
            peak = bench.status_kb(proxy.pid, "VmHWM")
            async with http.get(f"{root}/api/sessions/hostile/messages") as resp:
                rows = (await resp.json())["messages"]
    finally:
        await bench.stop_server(proxy)
    row = rows[0] if rows else {}
    lat.sort()
    return {
        "case": name,
        "status": status,
        "bytes": got,
        "cpu_s": cpu,
        "wall_s": wall,
        "rss_before_mb": rss0 / 1024,
        "peak_rss_mb": peak / 1024,
        "healthz_n": len(lat),
        "healthz_p50_ms": statistics.median(lat) if lat else None,
        "healthz_max_ms": lat[-1] if lat else None,
        "estimated": row.get("estimated"),
        "tokens": (row.get("inputTokens"), row.get("outputTokens")),
        "note": row.get("note"),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="spendgate-hostile-") as name:
        tmp = Path(name)
        port = bench.free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(port)]
        argv += ["--bomb-mib", str(args.bomb_mib)]
        env = {"PYTHONPATH": str(bench.BENCH.parent)}
        upstream = await bench.start_server(
            "upstream", argv, f"http://{bench.HOST}:{port}/", tmp, env
        )
        try:
            for i, case in enumerate(CASES):
                result = await one_case(tmp, upstream, i, case, args.src)
                cpu, rss = result["cpu_s"], result["peak_rss_mb"]
                print(f"  {result['case']}: {cpu:.2f} s CPU, {rss:.0f} MB", flush=True)
                results.append(result)
        finally:
            await bench.stop_server(upstream)
    return results


def report(results: list[dict[str, Any]], bomb_mib: int, wire_kb: float) -> str:
    lines = [
        f"gzip bomb: {wire_kb:,.0f} KB on the wire, {bomb_mib:,} MiB inflated.",
        "",
        "| case | proxy CPU s | wall s | peak RSS MB | /healthz p50 / max ms (n) | row | note |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        health = "—"
        if r["healthz_n"]:
            health = f"{r['healthz_p50_ms']:.1f} / {r['healthz_max_ms']:.0f} ({r['healthz_n']})"
        est = "estimated" if r["estimated"] else "as reported"
        tokens = "{} in, {} out".format(*r["tokens"])
        lines.append(
            f"| {r['case']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{health} | {tokens}, {est} | {r['note'] or '—'} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="the hostile upstream (started by the benchmark)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bomb-mib", type=int, default=1024)
    p.add_argument("--src", help="run the proxy from DIR/src (another checkout)")
    p.add_argument("--bomb-mib", type=int, default=1024, help="MiB the gzip bomb inflates to")
    p.add_argument("--json", help="write the raw results here too")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args.port, args.bomb_mib)
        return 0
    results = asyncio.run(run(args))
    wire = len(_bomb(args.bomb_mib)) / 1000
    print()
    print(report(results, args.bomb_mib, wire))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
