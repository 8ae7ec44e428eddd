"""``/metrics`` under client-chosen model names: ``python -m bench.metrics_cardinality``.

Clients choose the model names a request carries, and each used to become a label value
of a dozen series (issue #16: 4,000 names made ``/metrics`` 92 MB and each scrape
blocked the proxy for 2.6 s). This starts ``python -m spendgate serve`` (real defaults,
a temporary SQLite file, no budget) in front of an upstream that answers every chat
completion with the model the request named, sends one request for each of
``--models`` distinct names (plus a few the price table knows), then reads
``/metrics`` ``--scrapes`` times while a probe sends ``GET /healthz`` back to back:

- the size of ``/metrics`` and how many ``model`` values each family has;
- how long a scrape takes, and the proxy's CPU time per scrape (the scrape runs on the
  event loop, so that is how long it holds the proxy);
- the slowest ``/healthz`` answered during the scrapes (what another client waits),
  against the slowest without scrapes;
- that the sums over all label values still equal the traffic (nothing lost to
  ``other``).

    python -m bench.metrics_cardinality [--models 10000] [--scrapes 20]
                                        [--max-models 100[,1000...]]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench import run as bench

KNOWN = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5")
"""Models the bundled price table names: they keep their own label whatever the cap."""
PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7
CONCURRENCY = 32


async def _echo(request: web.Request) -> web.Response:
    """A chat completion naming the model the request named, with usage."""
    model = orjson.loads(await request.read()).get("model")
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }
    body = {
        "id": "chatcmpl-cardinality",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": usage,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def start_echo() -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = bench.free_port()
    await web.TCPSite(runner, bench.HOST, port).start()
    return runner, f"http://{bench.HOST}:{port}"


async def send_traffic(http: aiohttp.ClientSession, url: str, names: list[str]) -> int:
    """One chat completion per name, ``CONCURRENCY`` at a time; returns the 200s."""
    queue = iter(names)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for name in queue:
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(url, json=body) as r:
                await r.read()
                ok += r.status == 200

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ok


async def probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    """``GET /healthz`` back to back until ``stop``: each answer's latency in seconds."""
    out: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        async with http.get(url) as r:
            await r.read()
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.001)
    return out


async def scrape_under_probe(
    http: aiohttp.ClientSession, base: str, pid: int, scrapes: int
) -> dict[str, Any]:
    """``scrapes`` reads of /metrics while /healthz is probed; and a probe alone first."""
    stop = asyncio.Event()
    idle = asyncio.create_task(probe(http, base + "/healthz", stop))
    await asyncio.sleep(1.0)
    stop.set()
    idle_lat = await idle
    stop = asyncio.Event()
    busy = asyncio.create_task(probe(http, base + "/healthz", stop))
    times: list[float] = []
    text = ""
    cpu0 = bench.cpu_seconds(pid)
    for _ in range(scrapes):
        t0 = time.perf_counter()
        async with http.get(base + "/metrics") as r:
            text = await r.text()
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    cpu = bench.cpu_seconds(pid) - cpu0
    stop.set()
    busy_lat = await busy
    return {
        "bytes": len(text.encode()),
        "lines": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "scrape_p50_ms": statistics.median(times) * 1000,
        "scrape_max_ms": max(times) * 1000,
        # includes the probes' own share of the CPU (tiny: ~0.3 ms each)
        "cpu_ms_per_scrape": cpu / scrapes * 1000,
        "healthz_idle_max_ms": max(idle_lat) * 1000,
        "healthz_max_ms": max(busy_lat) * 1000,
        "healthz_probes": len(busy_lat),
        "text": text,
    }


def label_values(text: str) -> dict[str, int]:
    """Distinct model values per family (``model`` or ``gen_ai_request_model``)."""
    values: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model") or s.labels.get("gen_ai_request_model")
            if model is not None:
                values[family.name].add(model)
    return {name: len(v) for name, v in sorted(values.items())}


def sums(text: str) -> dict[str, float]:
    """Sums over every label value of the counters the traffic must equal."""
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "spendgate_requests_total":
                out["requests"] += s.value
            elif s.name == "spendgate_tokens_total" and s.labels["type"] in ("input", "output"):
                out[s.labels["type"]] += s.value
            elif s.name == "gen_ai_client_operation_duration_seconds_count":
                out["genai_count"] += s.value
    return dict(out)


async def measure(tmp: Path, models: int, scrapes: int, max_models: int) -> dict[str, Any]:
    runner, upstream = await start_echo()
    port = bench.free_port()
    env = {
        "SPENDGATE_HOST": bench.HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp / f"cardinality-{max_models}.db"),
        "SPENDGATE_OPENAI_BASE_URL": upstream,
        "SPENDGATE_METRICS_MAX_MODELS": str(max_models),
    }
    base = f"http://{bench.HOST}:{port}"
    argv = [sys.executable, "-m", "spendgate", "serve"]
    server = await bench.start_server(f"spendgate-{max_models}", argv, base + "/healthz", tmp, env)
    names = [f"client-model-{i:05d}" for i in range(models)] + [*KNOWN] * 10
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONCURRENCY + 4)
        ) as http:
            t0 = time.perf_counter()
            ok = await send_traffic(http, base + "/s/bench/openai/v1/chat/completions", names)
            traffic_s = time.perf_counter() - t0
            result = await scrape_under_probe(http, base, server.pid, scrapes)
    finally:
        await bench.stop_server(server)
        await runner.cleanup()
    text = result.pop("text")
    got = sums(text)
    result.update(
        max_models=max_models,
        requests=len(names),
        ok=ok,
        traffic_s=traffic_s,
        values=label_values(text),
        sums=got,
        exact=got.get("requests") == ok
        and got.get("input") == ok * PROMPT_TOKENS
        and got.get("output") == ok * COMPLETION_TOKENS
        and got.get("genai_count") == ok,
    )
    return result


def report(results: list[dict[str, Any]], models: int, scrapes: int) -> str:
    lines = [
        f"`python -m bench.metrics_cardinality --models {models} --scrapes {scrapes}`: "
        f"{models:,} distinct client-chosen model names, one request each, plus "
        f"{len(KNOWN)} models the price table knows (10 requests each).",
        "",
        "| `SPENDGATE_METRICS_MAX_MODELS` | `/metrics` | samples | scrape p50 / max "
        "| proxy CPU per scrape | `/healthz` max, idle → during scrapes | sums = traffic |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['max_models']} | {r['bytes'] / 1024:,.0f} KiB | {r['lines']:,} "
            f"| {r['scrape_p50_ms']:.1f} / {r['scrape_max_ms']:.1f} ms "
            f"| {r['cpu_ms_per_scrape']:.1f} ms "
            f"| {r['healthz_idle_max_ms']:.1f} → {r['healthz_max_ms']:.1f} ms "
            f"({r['healthz_probes']} probes) | {'yes' if r['exact'] else 'NO'} |"
        )
    lines += ["", "Model values per family:", ""]
    for r in results:
        per = ", ".join(f"`{k}` {v}" for k, v in r["values"].items())
        lines.append(f"- max {r['max_models']}: {per}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="spendgate-cardinality-") as tmp:
        for cap in args.max_models:
            results.append(await measure(Path(tmp), args.models, args.scrapes, cap))
    print(report(results, args.models, args.scrapes))
    return 0 if all(r["exact"] and r["ok"] == r["requests"] for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=10_000, help="distinct client-chosen names")
    p.add_argument("--scrapes", type=int, default=20, help="reads of /metrics to time")
    p.add_argument(
        "--max-models",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[100],
        help="SPENDGATE_METRICS_MAX_MODELS values to run, comma-separated",
    )
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
