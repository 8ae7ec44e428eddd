"""Run the whole benchmark and write bench/results.md: ``python -m bench.run [--quick]``.

Everything runs on loopback, each part in its own process: the fake upstream
(bench/fake_upstream.py), the floor proxy (bench/floor_proxy.py), spendgate itself
(``python -m spendgate serve`` with its real defaults: SQLite writes, events, metrics,
a budget on every session), the load generator (bench/load.py) and the SQLite writer
benchmark (bench/store_bench.py). CPU time per request is the proxy process's
utime+stime delta from /proc/<pid>/stat over a measured run, divided by its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
SPENDGATE_PATH = "/s/bench/openai/v1/chat/completions"
FLOOR_PATH = "/v1/chat/completions"
MODES = ("json", "stream")


@dataclass
class Sizes:
    """How much work each part does; ``--quick`` is a smoke test, not a measurement."""

    warmup: dict[str, int]
    requests: dict[str, int]
    reps: int
    concurrency: int
    paced_fraction: float
    """Paced latency runs offer this fraction of the floor's closed-loop req/s."""
    paced_s: float
    hold_streams: int
    hold_ramp_s: float
    hold_chunk_delay_s: float
    sse_subscribers: int
    sse_load_s: float
    store_rate: float
    store_duration_s: float
    store_burst: int


FULL = Sizes(
    warmup={"json": 1000, "stream": 400},
    requests={"json": 6000, "stream": 2500},
    reps=5,
    concurrency=16,
    paced_fraction=0.15,
    paced_s=8.0,
    hold_streams=1000,
    hold_ramp_s=2.0,
    hold_chunk_delay_s=0.1,
    sse_subscribers=100,
    sse_load_s=10.0,
    store_rate=12_000,
    store_duration_s=6.0,
    store_burst=60_000,
)
QUICK = Sizes(
    warmup={"json": 30, "stream": 10},
    requests={"json": 200, "stream": 60},
    reps=1,
    concurrency=16,
    paced_fraction=0.15,
    paced_s=0.4,
    hold_streams=30,
    hold_ramp_s=0.2,
    hold_chunk_delay_s=0.01,
    sse_subscribers=5,
    sse_load_s=0.6,
    store_rate=1_000,
    store_duration_s=0.5,
    store_burst=2_000,
)


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_server(
    name: str,
    argv: Sequence[str],
    health: str,
    tmp: Path,
    env: dict[str, str] | None = None,
    base_path: str = "",
) -> Server:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=tmp,
            env={**_clean_env(), **(env or {})},
        )
    server = Server(name, proc, health.rsplit("/", 1)[0] + base_path, log)
    deadline = time.monotonic() + 120  # under valgrind on a busy machine start-up is slow
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(health) as resp:
                    if resp.status == 200:
                        return server
            await asyncio.sleep(0.1)
    await stop_server(server)
    raise RuntimeError(f"{name} did not start; log:\n{log.read_text()[-2000:]}")


async def stop_server(server: Server) -> None:
    if server.proc.returncode is None:
        server.proc.terminate()
        try:
            await asyncio.wait_for(server.proc.wait(), 10)
        except TimeoutError:
            server.proc.kill()
            await server.proc.wait()


async def start_upstream(tmp: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port)]
    return await start_server("upstream", argv, f"http://{HOST}:{port}/", tmp)


async def start_floor(
    tmp: Path, upstream: Server, name: str = "floor", wrap: Sequence[str] = ()
) -> Server:
    """``wrap``: a command to run the proxy under (bench/instructions.py: valgrind)."""
    port = free_port()
    argv = [*wrap, sys.executable, str(BENCH / "floor_proxy.py"), "--port", str(port)]
    argv += ["--upstream", upstream.url.rstrip("/")]
    health = f"http://{HOST}:{port}/v1/models"
    return await start_server(name, argv, health, tmp, base_path=FLOOR_PATH)


BUDGETS = {
    "session": {"SPENDGATE_DEFAULT_SESSION_BUDGET_USD": "1000000"},
    "all": {
        "SPENDGATE_DEFAULT_SESSION_BUDGET_USD": "1000000",
        "SPENDGATE_GLOBAL_BUDGET_USD": "1000000",
        "SPENDGATE_GLOBAL_BUDGET_PERIOD": "day",
    },
    "none": {},
}
"""What budgets the benchmarked proxy holds requests to (large, so nothing is refused):
``session`` (the default: every session has one), ``all`` (a daily global budget too),
``none`` (admission reserves nothing)."""


async def start_spendgate(
    tmp: Path,
    upstream: Server,
    name: str = "spendgate",
    wrap: Sequence[str] = (),
    budgets: str = "session",
) -> Server:
    port = free_port()
    env = {
        "SPENDGATE_HOST": HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp / f"{name}.db"),
        "SPENDGATE_OPENAI_BASE_URL": upstream.url.rstrip("/"),
        **BUDGETS[budgets],
    }
    argv = [*wrap, sys.executable, "-m", "spendgate", "serve"]
    health = f"http://{HOST}:{port}/healthz"
    return await start_server(name, argv, health, tmp, env, base_path=SPENDGATE_PATH)


# -- the load generator --------------------------------------------------------------------


async def run_tool(script: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run a bench/ script to the end; its last stdout line is its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{script} {' '.join(args)} timed out after {timeout} s") from None
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result


async def load(url: str, mode: str, n: int, concurrency: int, **extra: Any) -> dict[str, Any]:
    args = ["run", "--url", url, "--mode", mode, "-c", str(concurrency), "-n", str(n)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return await run_tool("load.py", *args)


async def measured_load(
    server: Server, mode: str, n: int, concurrency: int, **extra: Any
) -> dict[str, Any]:
    cpu0 = cpu_seconds(server.pid)
    result = await load(server.url, mode, n, concurrency, **extra)
    cpu = cpu_seconds(server.pid) - cpu0
    result["cpu_s"] = cpu
    result["cpu_us_per_req"] = cpu / max(result["requests"], 1) * 1e6
    return result


@contextlib.asynccontextmanager
async def line_process(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / script),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=_clean_env(),
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def read_line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    return line.decode().strip()


# -- the parts of the benchmark ------------------------------------------------------------


@dataclass
class Row:
    proxy: str
    mode: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    paced: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_kb: int = 0

    def median(self, key: str, paced: bool = False) -> float:
        runs = self.paced if paced else self.runs
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    @property
    def errors(self) -> int:
        return sum(r["errors"] for r in self.runs)

    def paired(self, floor: Row, key: str, ratio: bool = True) -> float:
        """Median over repetitions of this row's run against the floor run made next to
        it (ratio, or difference): slow drifts of a shared machine cancel within a pair."""
        pairs = zip(self.runs, floor.runs, strict=False)
        values = [a[key] / b[key] if ratio else a[key] - b[key] for a, b in pairs]
        return statistics.median(values) if values else float("nan")


async def throughput(
    sizes: Sizes, upstream: Server, floor: Server, spendgate: Server
) -> dict[tuple[str, str], Row]:
    rows: dict[tuple[str, str], Row] = {}
    c = sizes.concurrency
    for mode in MODES:
        direct = Row("upstream (no proxy)", mode)
        direct.runs.append(await load(upstream.url + FLOOR_PATH, mode, sizes.requests[mode], c))
        rows[("direct", mode)] = direct
        for server in (floor, spendgate):  # warm up: connections, caches, first imports
            await load(server.url, mode, sizes.warmup[mode], c)
        for rep in range(sizes.reps):
            order = (floor, spendgate) if rep % 2 == 0 else (spendgate, floor)
            for server in order:
                row = rows.setdefault((server.name, mode), Row(server.name, mode))
                row.runs.append(await measured_load(server, mode, sizes.requests[mode], c))
        # Latency below saturation: the same paced rate through both proxies.
        rate = max(1.0, round(rows[("floor", mode)].median("rps") * sizes.paced_fraction))
        n = max(1, int(rate * sizes.paced_s))
        for rep in range(max(1, sizes.reps - 1)):
            order = (floor, spendgate) if rep % 2 == 0 else (spendgate, floor)
            for server in order:
                paced = await measured_load(server, mode, n, c, rate=rate)
                paced["rate"] = rate
                rows[(server.name, mode)].paced.append(paced)
        for server in (floor, spendgate):
            rows[(server.name, mode)].peak_rss_kb = status_kb(server.pid, "VmHWM")
        print(f"  {mode}: done", flush=True)
    return rows


async def active_streams(server: Server) -> float | None:
    url = server.url.split("/s/", 1)[0] + "/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("spendgate_active_streams "):
                return float(line.split()[1])
    return None


async def hold_streams(sizes: Sizes, server: Server) -> dict[str, Any]:
    """Open many slow streams at once; RSS while every one of them is open."""
    rss_before = status_kb(server.pid, "VmRSS")
    args = ["hold", "--url", server.url, "--streams", str(sizes.hold_streams)]
    args += ["--ramp", str(sizes.hold_ramp_s), "--chunk-delay", str(sizes.hold_chunk_delay_s)]
    async with line_process("load.py", *args) as proc:
        line = await read_line(proc, sizes.hold_ramp_s + 60)
        rss_open = status_kb(server.pid, "VmRSS")
        gauge = await active_streams(server) if server.name.startswith("spendgate") else None
        timeout = 64 * sizes.hold_chunk_delay_s + 120
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    result: dict[str, Any] = orjson.loads(out.decode().strip().splitlines()[-1])
    parts = line.split()
    result.update(
        open_at_sample=int(parts[1]) if len(parts) > 1 else 0,
        open_after_s=float(parts[2]) if len(parts) > 2 else None,
        rss_before_kb=rss_before,
        rss_open_kb=rss_open,
        peak_rss_kb=status_kb(server.pid, "VmHWM"),
        active_streams_gauge=gauge,
    )
    return result


async def sse_lag(sizes: Sizes, spendgate: Server) -> dict[str, Any]:
    """Subscribers on /api/events while a streaming load runs; lag of every event."""
    events = spendgate.url.split("/s/", 1)[0] + "/api/events?types=token.usage"
    args = ["sse", "--url", events, "--subscribers", str(sizes.sse_subscribers)]
    async with line_process("load.py", *args) as proc:
        ready = await read_line(proc, 60)
        n = 1_000_000
        result = await load(
            spendgate.url, "stream", n, sizes.concurrency, duration=sizes.sse_load_s
        )
        await asyncio.sleep(0.3)  # let the last events arrive
        out, _ = await asyncio.wait_for(proc.communicate(b"stop\n"), 60)
    lag: dict[str, Any] = orjson.loads(out.decode().strip().splitlines()[-1])
    lag["ready"] = ready
    lag["load"] = result
    lag["events_per_s"] = lag["events"] / max(result["elapsed_s"], 1e-9)
    return lag


# -- the report ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = int(f.readline().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    import spendgate

    return {
        "CPU": model,
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": aiohttp.__version__,
        "spendgate": spendgate.__version__,
        "event loop": "uvloop" if _has_uvloop() else "asyncio (uvloop not installed)",
    }


def _has_uvloop() -> bool:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.{digits}f}"


def _ok(passed: bool) -> str:
    return "**met**" if passed else "**not met**"


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: dict[tuple[str, str], Row] = results["rows"]
    out: list[tuple[str, str, bool]] = []
    for mode in MODES:
        sg, fl = rows[("spendgate", mode)], rows[("floor", mode)]
        ratio = sg.paired(fl, "cpu_us_per_req")
        out.append((f"CPU per request ≤ 1.3× floor ({mode})", f"{ratio:.2f}×", ratio <= 1.3))
    for mode in MODES:
        sg, fl = rows[("spendgate", mode)], rows[("floor", mode)]
        c, rate = results["sizes"].concurrency, fl.paced[0]["rate"] if fl.paced else 0
        added = sg.paired(fl, "p50_ms", ratio=False)
        out.append(
            (
                f"p50 added latency ≤ 1 ms, {c} clients, closed loop ({mode})",
                f"{added:+.2f} ms",
                added <= 1,
            )
        )
        added = sg.median("p50_ms", paced=True) - fl.median("p50_ms", paced=True)
        out.append(
            (
                f"p50 added latency ≤ 1 ms, {c} clients paced at {rate:,.0f} req/s ({mode})",
                f"{added:+.2f} ms",
                added <= 1,
            )
        )
    hold = results["hold"]["spendgate"]
    n = results["sizes"].hold_streams
    failed = hold["streams"] - hold["completed"]
    held = hold["open_at_sample"] == n and failed == 0
    out.append(
        (
            f"{n:,} concurrent open streams held, none failed",
            f"{hold['open_at_sample']:,} open at once, {failed} failed",
            held,
        )
    )
    rss = hold["peak_rss_kb"] / 1024
    out.append((f"RSS ≤ 150 MB with {n:,} open streams", f"{rss:.0f} MB peak", rss <= 150))
    sse = results["sse"]
    p99 = sse["p99_ms"] if sse["p99_ms"] is not None else float("inf")
    ok = p99 <= 50 and sse["connected"] == sse["subscribers"] and sse["errors"] == 0
    out.append(
        (
            f"{sse['subscribers']} SSE subscribers, p99 event lag ≤ 50 ms, none dropped",
            f"{p99:.1f} ms, {sse['dropped']} dropped",
            ok,
        )
    )
    st = results["store"]["sustained"]
    ok = st["committed_rows_per_s"] >= 10_000 and not st["queue_growing"]
    ok = ok and results["store"]["stored_rows"] == results["store"]["expected"]
    out.append(
        (
            "SQLite writer ≥ 10,000 rows/s, queue not growing",
            f"{st['committed_rows_per_s']:,.0f} rows/s, max queue {st['max_queue_depth']:,}",
            ok,
        )
    )
    return out


def report(results: dict[str, Any], command: str) -> str:
    sizes: Sizes = results["sizes"]
    rows: dict[tuple[str, str], Row] = results["rows"]
    lines = [
        "# spendgate benchmark results",
        "",
        f"Generated by `{command}` on {results['date']} in {results['elapsed_s']:.0f} s.",
        "Everything on loopback; each server, the load generator and the subscribers in "
        "their own process. Reproduce with the same command (see bench/README.md).",
    ]
    if results["quick"]:
        lines += ["", "**Quick run (`--quick`): a smoke test on a tiny load, not a measurement.**"]
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    lines.append(
        f"| load average (1, 5, 15 min) | {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end |"
    )
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {_ok(ok)} |" for name, value, ok in targets(results)]
    lines += [
        "",
        f"## Throughput, latency, CPU (closed loop, {sizes.concurrency} concurrent clients)",
        "",
        f"Requests per measured run: {sizes.requests['json']:,} non-streaming, "
        f"{sizes.requests['stream']:,} streaming (64 content chunks + usage chunk + [DONE]); "
        f"{sizes.reps} run(s) each, floor and spendgate alternating, after a warm-up; "
        "medians shown. CPU per request = the proxy process's utime+stime delta over the "
        "run / requests. The CPU ratio and the closed-loop p50 targets are medians of each "
        "spendgate run against the floor run beside it. Peak RSS = VmHWM after that mode's "
        "runs (cumulative per process: non-streaming runs first).",
        "",
        "| proxy | mode | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for key in ("direct", "floor", "spendgate"):
            row = rows[(key, mode)]
            cpu = row.median("cpu_us_per_req") if key != "direct" else None
            rss = row.peak_rss_kb / 1024 if row.peak_rss_kb else None
            lines.append(
                f"| {row.proxy} | {mode} | {_f(row.median('rps'))} | "
                f"{_f(row.median('p50_ms'), 2)} | {_f(row.median('p99_ms'), 2)} | {_f(cpu)} | "
                f"{_f(rss, 1)} | {row.errors} |"
            )
    lines += ["", "| ratio spendgate / floor | req/s | p50 | p99 | CPU/req | peak RSS |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        sg, fl = rows[("spendgate", mode)], rows[("floor", mode)]
        ratios = [sg.median(k) / fl.median(k) for k in ("rps", "p50_ms", "p99_ms")]
        ratios.append(sg.paired(fl, "cpu_us_per_req"))
        ratios.append(sg.peak_rss_kb / fl.peak_rss_kb)
        lines.append(f"| {mode} | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    lines += [
        "",
        f"### Latency below saturation ({sizes.concurrency} clients, paced)",
        "",
        "The closed loop above saturates the 2 cores, so its latencies are mostly queueing "
        "(≈ clients × the busiest process's CPU per request). Here both proxies get the same "
        f"fixed request rate, {sizes.paced_fraction:.0%} of the floor's closed-loop req/s, from "
        f"{sizes.concurrency} clients for {sizes.paced_s} s: the latency a client sees "
        "added under ordinary load.",
        "",
        "| proxy | mode | offered req/s | p50 ms | p99 ms | CPU µs/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for key in ("floor", "spendgate"):
            row = rows[(key, mode)]
            rate = row.paced[0]["rate"] if row.paced else None
            lines.append(
                f"| {row.proxy} | {mode} | {_f(rate)} | {_f(row.median('p50_ms', True), 2)} | "
                f"{_f(row.median('p99_ms', True), 2)} | "
                f"{_f(row.median('cpu_us_per_req', True))} | "
                f"{sum(r['errors'] for r in row.paced)} |"
            )
    lines += ["", "Per run (CPU µs/req): "]
    for mode in MODES:
        for key in ("floor", "spendgate"):
            runs = ", ".join(_f(r["cpu_us_per_req"]) for r in rows[(key, mode)].runs)
            lines.append(f"- {key} {mode}: {runs}")
    hold = results["hold"]
    lines += [
        "",
        f"## {sizes.hold_streams:,} concurrent open streams",
        "",
        f"Streams opened over {sizes.hold_ramp_s} s; the upstream pauses "
        f"{sizes.hold_chunk_delay_s * 1000:.0f} ms before each of its 66 chunks, so every "
        "stream stays open for a while; RSS read once all have their first chunk. A fresh "
        "process of each proxy.",
        "",
        "| proxy | open at once | completed | failed | RSS idle MB | RSS all open MB "
        "| peak RSS MB | active_streams gauge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, h in hold.items():
        lines.append(
            f"| {name} | {h['open_at_sample']:,} | {h['completed']:,} | "
            f"{h['streams'] - h['completed']} | {h['rss_before_kb'] / 1024:.1f} | "
            f"{h['rss_open_kb'] / 1024:.1f} | {h['peak_rss_kb'] / 1024:.1f} | "
            f"{_f(h['active_streams_gauge'])} |"
        )
    sse = results["sse"]
    ld = sse["load"]
    lines += [
        "",
        "## Live events under load",
        "",
        f"{sse['subscribers']} subscribers on `/api/events?types=token.usage` "
        f"({sse['connected']} connected) while {sizes.concurrency} clients stream for "
        f"{sizes.sse_load_s} s ({ld['requests']:,} requests, {_f(ld['rps'])} req/s, "
        f"p50 {_f(ld['p50_ms'], 2)} ms). Lag = receive time − the event's `timestamp`.",
        "",
        "| events received | events/s | lag p50 ms | lag p99 ms | lag max ms "
        "| subscribers dropped | other errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {sse['events']:,} | {_f(sse['events_per_s'])} | {_f(sse['p50_ms'], 2)} | "
        f"{_f(sse['p99_ms'], 2)} | {_f(sse['max_ms'], 2)} | {sse['dropped']} | "
        f"{sse['errors'] - sse['dropped']} |",
        "",
        "p99 lag of the events created in each second: "
        + ", ".join(_f(v) for v in sse["p99_ms_by_second"])
        + " ms. A dropped subscriber is one spendgate cut off for falling behind (its queue "
        "of `SPENDGATE_SUBSCRIBER_QUEUE` events full); its later events are not counted.",
    ]
    st, bu = results["store"]["sustained"], results["store"]["burst"]
    lines += [
        "",
        "## SQLite writer (`SQLiteStore` driven directly)",
        "",
        f"Offered {st['offered_rows_per_s']:,.0f} rows/s of `MessageRecord` for "
        f"{sizes.store_duration_s} s (`add_message`, default 200 ms flush interval), then a "
        f"burst of {bu['rows']:,} rows queued at once. Queue growing = the second half's "
        "largest queue depth above 1.5× the first half's (and above 0.1 s of rows + 500).",
        "",
        "| committed rows/s (sustained) | max queue depth | 1st half / 2nd half | "
        "drain after stop ms | burst rows/s | rows stored / expected |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {st['committed_rows_per_s']:,.0f} | {st['max_queue_depth']:,} | "
        f"{st['max_queue_depth_first_half']:,} / {st['max_queue_depth_second_half']:,} | "
        f"{st['drain_after_stop_ms']:.1f} | {bu['rows_per_s']:,.0f} | "
        f"{results['store']['stored_rows']:,} / {results['store']['expected']:,} |",
        "",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def raise_nofile(want: int = 16384) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    raise_nofile()
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "loadavg_start": _loadavg(),
        "quick": args.quick,
        "sizes": sizes,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-") as tmpname:
        tmp = Path(tmpname)
        try:
            upstream = await start_upstream(tmp)
            servers.append(upstream)
            floor, spendgate = await asyncio.gather(
                start_floor(tmp, upstream), start_spendgate(tmp, upstream)
            )
            servers += [floor, spendgate]
            print("throughput, latency, CPU ...", flush=True)
            results["rows"] = await throughput(sizes, upstream, floor, spendgate)
            print("live events under load ...", flush=True)
            results["sse"] = await sse_lag(sizes, spendgate)
            for server in (floor, spendgate):
                await stop_server(server)
            print("open streams ...", flush=True)
            held = await asyncio.gather(
                start_floor(tmp, upstream, "floor-hold"),
                start_spendgate(tmp, upstream, "spendgate-hold"),
            )
            servers += held
            results["hold"] = {}
            for server in held:  # one at a time: each gets the machine to itself
                name = server.name.removesuffix("-hold")
                results["hold"][name] = await hold_streams(sizes, server)
                await stop_server(server)
        finally:
            for server in reversed(servers):
                await stop_server(server)
    print("SQLite writer ...", flush=True)
    results["store"] = await run_tool(
        "store_bench.py",
        "--rate",
        str(sizes.store_rate),
        "--duration",
        str(sizes.store_duration_s),
        "--burst",
        str(sizes.store_burst),
    )
    results["elapsed_s"] = time.monotonic() - t0
    results["loadavg_end"] = _loadavg()
    return results


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def to_json(results: dict[str, Any]) -> bytes:
    def default(obj: Any) -> Any:
        if isinstance(obj, Row):
            return obj.__dict__
        if isinstance(obj, Sizes):
            return obj.__dict__
        raise TypeError(type(obj))

    flat = dict(results)
    flat["rows"] = {f"{k[0]}/{k[1]}": v for k, v in results["rows"].items()}
    flat["targets"] = [
        {"target": name, "measured": value, "met": ok} for name, value, ok in targets(results)
    ]
    return orjson.dumps(flat, default=default, option=orjson.OPT_INDENT_2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny load: checks it runs, ~15 s")
    p.add_argument("--out", type=Path, default=BENCH / "results.md", help="the Markdown report")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    args = p.parse_args(argv)
    results = asyncio.run(run(args))
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    text = report(results, command)
    args.out.write_text(text)
    if args.json:
        args.json.write_bytes(to_json(results))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
