"""The load generator, in its own process: prints one JSON line of results on stdout.

    python -m bench.load run  --url URL --mode stream|json -c 16 -n 2000 [--duration 30]
    python -m bench.load hold --url URL --streams 1000 --ramp 2      # open streams, held
    python -m bench.load sse  --url EVENTS_URL --subscribers 100     # event lag, until stdin

``run``: closed loop (N workers) or paced (``--rate``), latency per request = first byte
sent to last body byte read. ``hold``: opens ``--streams`` streams spread over
``--ramp`` seconds, prints ``OPEN <n>`` once every one has its first chunk, then reads
them to the end. ``sse``: connects subscribers, prints ``READY`` once all are
connected, records lag = receive time - the event's ``timestamp`` until a line (or EOF)
arrives on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import aiohttp
import orjson

MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a benchmark. Answer with 64 tokens."},
    {"role": "user", "content": "Count to sixty-four, one word per token, please."},
]
DROPPED = "the server ended the event stream (dropped as too slow?)"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-0123456789"}


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=300, sock_read=120),
        auto_decompress=False,
    )


async def _one(http: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> int:
    """One request read to the end; the number of body bytes, or raises."""
    async with http.post(url, data=body, headers=HEADERS) as resp:
        size = 0
        tail = b""
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            tail = (tail + chunk)[-32:]
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
        if stream and not tail.endswith(b"data: [DONE]\n\n"):
            raise RuntimeError("stream did not end with [DONE]")
        return size


async def cmd_run(args: argparse.Namespace) -> None:
    stream = args.mode == "stream"
    body = request_body(stream)
    latencies: list[float] = []
    errors: list[str] = []
    state = {"next": 0}
    deadline = time.perf_counter() + args.duration
    async with _session(args.concurrency) as http:
        t0 = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = state["next"]
                if i >= args.requests:
                    return
                state["next"] = i + 1
                if args.rate:
                    delay = t0 + i / args.rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                start = time.perf_counter()
                try:
                    await _one(http, args.url, body, stream)
                except Exception as exc:
                    errors.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    emit(
        {
            "requests": len(latencies),
            "errors": len(errors),
            "first_errors": errors[:3],
            "elapsed_s": elapsed,
            "rps": len(latencies) / elapsed if elapsed else 0.0,
            "p50_ms": _ms(percentile(latencies, 50)),
            "p99_ms": _ms(percentile(latencies, 99)),
        }
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


async def cmd_hold(args: argparse.Namespace) -> None:
    body = request_body(True)
    headers = dict(HEADERS)
    if args.chunk_delay is not None:
        headers["X-Bench-Chunk-Delay"] = str(args.chunk_delay)
    opened = 0
    all_open = asyncio.Event()
    errors: list[str] = []
    done = 0

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal opened, done
        await asyncio.sleep(args.ramp * i / args.streams)
        try:
            async with http.post(args.url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
                first = True
                tail = b""
                async for chunk in resp.content.iter_any():
                    if first:
                        first = False
                        opened += 1
                        if opened == args.streams:
                            all_open.set()
                    tail = (tail + chunk)[-32:]
                if not tail.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError("stream did not end with [DONE]")
                done += 1
        except Exception as exc:
            errors.append(repr(exc))

    async with _session(0) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(http, i)) for i in range(args.streams)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), args.ramp + args.open_timeout)
        sys.stdout.write(f"OPEN {opened} {time.perf_counter() - t0:.3f}\n")
        sys.stdout.flush()
        await asyncio.gather(*tasks)
    emit({"streams": args.streams, "opened": opened, "completed": done, "errors": len(errors),
          "first_errors": errors[:3]})  # fmt: skip


async def cmd_sse(args: argparse.Namespace) -> None:
    lags: list[float] = []
    stamps: list[float] = []
    connected = 0
    ready = asyncio.Event()
    errors: list[str] = []

    async def subscriber(http: aiohttp.ClientSession) -> None:
        nonlocal connected
        try:
            async with http.get(args.url) as resp:
                buf = b""
                first = True
                async for chunk in resp.content.iter_any():
                    now = time.time()
                    if first:
                        first = False
                        connected += 1
                        if connected == args.subscribers:
                            ready.set()
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        for line in ev.split(b"\n"):
                            if line.startswith(b"data: "):
                                stamp = orjson.loads(line[6:])["timestamp"]
                                lags.append(now - stamp)
                                stamps.append(stamp)
                errors.append(DROPPED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            errors.append(repr(exc))

    async with _session(0) as http:
        tasks = [asyncio.create_task(subscriber(http)) for _ in range(args.subscribers)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 30)
        sys.stdout.write(f"READY {connected}\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    emit(
        {
            "subscribers": args.subscribers,
            "connected": connected,
            "events": len(lags),
            "errors": len(errors),
            "dropped": errors.count(DROPPED),
            "first_errors": errors[:3],
            "p50_ms": _ms(percentile(lags, 50)),
            "p99_ms": _ms(percentile(lags, 99)),
            "max_ms": _ms(max(lags) if lags else None),
            "p99_ms_by_second": _by_second(stamps, lags),
        }
    )


def _by_second(stamps: list[float], lags: list[float]) -> list[float | None]:
    """p99 lag of the events created in each second of the run: flat, or growing?"""
    if not stamps:
        return []
    t0 = min(stamps)
    buckets: dict[int, list[float]] = {}
    for stamp, lag in zip(stamps, lags, strict=True):
        buckets.setdefault(int(stamp - t0), []).append(lag)
    return [_ms(percentile(buckets.get(i, []), 99)) for i in range(max(buckets) + 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="N concurrent clients, fixed count or duration")
    r.add_argument("--url", required=True)
    r.add_argument("--mode", choices=("stream", "json"), default="stream")
    r.add_argument("-c", "--concurrency", type=int, default=16)
    r.add_argument("-n", "--requests", type=int, default=1000)
    r.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    r.add_argument("--rate", type=float, default=0.0, help="pace to this many requests/s")
    h = sub.add_parser("hold", help="open many streams at once and hold them")
    h.add_argument("--url", required=True)
    h.add_argument("--streams", type=int, default=1000)
    h.add_argument("--ramp", type=float, default=2.0)
    h.add_argument("--open-timeout", type=float, default=20.0)
    h.add_argument("--chunk-delay", type=float, default=None)
    s = sub.add_parser("sse", help="event subscribers measuring lag")
    s.add_argument("--url", required=True)
    s.add_argument("--subscribers", type=int, default=100)
    args = p.parse_args()
    cmd = {"run": cmd_run, "hold": cmd_hold, "sse": cmd_sse}[args.cmd]
    asyncio.run(cmd(args))


if __name__ == "__main__":
    main()
