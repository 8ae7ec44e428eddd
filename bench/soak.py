"""Soak test: ``python -m bench.soak [--minutes 3] [--seed N]`` (a few minutes, not in CI).

Starts the fake upstream (bench/fake_upstream.py) and ``python -m spendgate serve`` with
its real defaults (a temporary SQLite file, no default budget, a 2 s upstream idle
timeout), puts budgets on a few sessions, then for the duration drives mixed traffic
from a few workers across 20 sessions: streaming and non-streaming chat completions,
clients that hang up mid-stream, upstream faults (resets, stalls past the idle timeout,
500s, 429s), 402s from budgets and manual pauses, and SSE subscribers joining and
leaving. Every request carries its own API key, so its row can be found on disk by the
key fingerprint spendgate stores. At the end it audits the SQLite file against what the
clients saw, the API's session totals against the rows, and spendgate's RSS over time;
it prints a Markdown report, writes it to bench/soak.md and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.run import (
    BENCH,
    HOST,
    Server,
    _loadavg,
    free_port,
    machine,
    raise_nofile,
    start_server,
    start_upstream,
    status_kb,
)

MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a soak test. Answer with 64 tokens."},
    {"role": "user", "content": "Count to sixty-four, one word per token, please."},
]
CONTENT_CHUNKS = 64  # what the fake upstream streams (bench/fake_upstream.py)
FULL_ANSWER = (42, 64, 0, 0.0000447)
"""A complete answer's row: input and output tokens, estimated, cost (gpt-4o-mini prices:
42 × $0.15/M + 64 × $0.60/M)."""
BUDGETED = ("b-00", "b-01", "b-02", "b-03")
"""Sessions with a small budget, raised again now and then once they pause."""
MANUAL = "m-00"
"""A session paused and resumed by hand (POST .../pause, .../resume) in cycles."""
SESSIONS = (*BUDGETED, MANUAL, *(f"s-{i:02d}" for i in range(15)))
SESSION_WEIGHTS = [3] * len(BUDGETED) + [1] * (len(SESSIONS) - len(BUDGETED))
MAX_RESERVATION = 0.0025
"""The most one request reserves: no ``max_tokens``, so 4,096 output tokens at $0.60/M,
plus its input."""
BUDGET_STEP = 0.0012
"""USD added to a budgeted session: ~27 full answers (a stream costs ~$0.0000447), or
less than one reservation of a request without ``max_tokens`` (~$0.00246)."""
IDLE_TIMEOUT_S = 2.0
FAULT_SLEEP_S = 4.0
"""How long the upstream hangs or stalls: past spendgate's idle timeout."""
HANGUP_CHUNK_DELAY_S = 0.02
"""Upstream pace of streams whose client hangs up, so the hang-up is mid-stream."""
GIVE_UP_S = 0.5
"""How long an impatient client waits for an answer (the upstream is silent)."""
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_read=15)
SSE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)
SAMPLE_EVERY_S = 2.0
SSE_SLOTS = 4
KEEPALIVE_S = 15.0
"""spendgate's SSE keep-alive: the longest it should take to notice a subscriber left."""
RSS_GROWTH_LIMIT = 0.20
COST_TOLERANCE = 1e-9


# -- the traffic mix --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    weight: int
    stream: bool | None
    """None: streaming or not, at random."""
    expect: int
    """The status spendgate should answer (unless the session is paused: 402)."""
    what: str
    fault: Callable[[random.Random], str] | None = None
    """The fake upstream's ``X-Bench-Fault`` header."""
    hangup: bool = False
    give_up_s: float | None = None
    """The client stops waiting for the answer after this long (before any status)."""
    upstream_error: str | None = None
    """The ``spendgate_upstream_errors_total`` kind this fault should count as."""


SCENARIOS = (
    Scenario("stream", 38, True, 200, "streamed to the end"),
    Scenario("json", 18, False, 200, "non-streaming"),
    Scenario("hangup", 12, True, 200, "client reads 1-5 events, then closes", hangup=True),
    Scenario(
        "stream_reset", 5, True, 200, "upstream RST after 1-20 chunks",
        lambda r: f"reset:{r.randint(1, 20)}", upstream_error="reset",
    ),
    Scenario(
        "stream_stall", 3, True, 200, f"upstream silent {FAULT_SLEEP_S:g} s after 3 chunks",
        lambda r: f"stall:3:{FAULT_SLEEP_S}", upstream_error="timeout",
    ),
    Scenario(
        "hang", 3, None, 504, f"upstream silent {FAULT_SLEEP_S:g} s before headers",
        lambda r: f"hang:{FAULT_SLEEP_S}", upstream_error="timeout",
    ),
    Scenario(
        "impatient", 2, None, 504, f"client gives up after {GIVE_UP_S:g} s of a silent upstream",
        lambda r: f"hang:{FAULT_SLEEP_S}", give_up_s=GIVE_UP_S, upstream_error="timeout",
    ),
    Scenario(
        "json_reset", 3, False, 502, "upstream RST before headers",
        lambda r: "reset", upstream_error="reset",
    ),
    Scenario(
        "json_cut", 2, False, 502, "upstream RST after 40 bytes of a JSON body (a clean 502)",
        lambda r: "cut:40", upstream_error="reset",
    ),
    Scenario("http500", 4, None, 500, "upstream answers 500", lambda r: "500",
             upstream_error="http_5xx"),
    Scenario("http429", 4, None, 429, "upstream answers 429", lambda r: "429",
             upstream_error="http_429"),
)  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}
PROBE = Scenario("probe", 0, False, 200, "after traffic: one request per budgeted session")
BY_NAME[PROBE.name] = PROBE


@dataclass(slots=True)
class Req:
    """One request as its client saw it."""

    n: int
    session: str
    scenario: str
    stream: bool
    fingerprint: str
    started: float
    status: int | None = None
    hung_up: bool = False
    gave_up: bool = False
    """Hung up before any status (the ``impatient`` scenario)."""
    outcome: str = "ok"
    """``ok``, or what was wrong with the answer."""
    error: str | None = None
    """A client-side exception."""
    ended: float = 0.0


def fingerprint(key: str) -> str:
    """What spendgate stores for an API key (first 12 hex chars of its SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def sse_events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


def check_answer(sc: Scenario, req: Req, data: bytes, headers: Any) -> str:
    """``ok`` if the body is what this scenario and status should give, else the problem."""
    status = req.status
    if status == 402:
        try:
            code = orjson.loads(data)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "402 body is not an OpenAI error"
        if code != "session_budget_exceeded" or headers.get("x-should-retry") != "false":
            return "402 without session_budget_exceeded / x-should-retry: false"
        return "ok"
    if status != sc.expect:
        return f"status {status}, expected {sc.expect}"
    if status != 200:
        try:
            orjson.loads(data)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return f"{status} body is not an error JSON"
        return "ok"
    if not req.stream:
        try:
            usage = orjson.loads(data)["usage"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "JSON body without usage"
        return "ok" if usage.get("prompt_tokens") == 42 else "JSON usage changed"
    events = sse_events(data)
    content = sum(1 for e in events if e.startswith(b"data: {") and b'"choices":[{' in e)
    if not data.endswith(b"data: [DONE]\n\n"):
        return "stream did not end with [DONE]"
    if b'"prompt_tokens"' in data:
        return "the usage chunk spendgate added reached the client"
    if sc.fault is None:
        return "ok" if content == CONTENT_CHUNKS else f"{content} content chunks"
    if b'"upstream_error"' not in data:
        return "broken stream without an in-band error event"
    return "ok" if content < CONTENT_CHUNKS else "all chunks despite the fault"


class Traffic:
    """The workers: each loops until the deadline, one request at a time."""

    def __init__(self, base: str, seed: int, deadline: float) -> None:
        self.base = base
        self.seed = seed
        self.deadline = deadline
        self.reqs: list[Req] = []
        self._n = 0

    def next_key(self) -> tuple[int, str]:
        self._n += 1
        return self._n, f"sk-soak-{self.seed}-{self._n:07d}"

    async def worker(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        weights = [s.weight for s in SCENARIOS]
        while time.monotonic() < self.deadline:
            session = rng.choices(SESSIONS, SESSION_WEIGHTS)[0]
            sc = rng.choices(SCENARIOS, weights)[0]
            await self.one(http, rng, sc, session)
            await asyncio.sleep(rng.uniform(0, 0.15))

    async def one(
        self, http: aiohttp.ClientSession, rng: random.Random, sc: Scenario, session: str
    ) -> Req:
        n, key = self.next_key()
        stream = sc.stream if sc.stream is not None else rng.random() < 0.5
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
        if stream:
            body["stream"] = True
        max_tokens = rng.choice((None, None, 128, 1024))
        if max_tokens:
            body["max_tokens"] = max_tokens
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if rng.random() < 0.5:
            url = f"{self.base}/s/{session}/openai/v1/chat/completions"
        else:
            url = f"{self.base}/v1/chat/completions"
            headers["X-Spendgate-Session"] = session
        if sc.fault is not None:
            headers["X-Bench-Fault"] = sc.fault(rng)
        if sc.hangup:
            headers["X-Bench-Chunk-Delay"] = str(HANGUP_CHUNK_DELAY_S)
        elif stream:
            headers["X-Bench-Chunk-Delay"] = str(rng.choice((0, 0.002, 0.005)))
        req = Req(n, session, sc.name, stream, fingerprint(key), time.monotonic())
        self.reqs.append(req)
        timeout = aiohttp.ClientTimeout(total=sc.give_up_s) if sc.give_up_s else None
        try:
            async with http.post(
                url, data=orjson.dumps(body), headers=headers, timeout=timeout or REQUEST_TIMEOUT
            ) as resp:
                req.status = resp.status
                if sc.hangup and resp.status == 200:
                    want, seen = rng.randint(1, 5), 0
                    async for chunk in resp.content.iter_any():
                        seen += chunk.count(b"\n\n")
                        if seen >= want:
                            break
                    req.hung_up = True
                    resp.close()  # drop the connection mid-stream
                else:
                    data = await resp.read()
                    req.outcome = check_answer(sc, req, data, resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            req.error = repr(exc)[:200]
            if req.status is None and sc.give_up_s and isinstance(exc, TimeoutError):
                req.gave_up = True
            elif req.status is None:
                req.outcome = "no answer"
            else:
                req.outcome = f"read failed: {type(exc).__name__}"
        req.ended = time.monotonic()
        return req


# -- the rest of the cast: budgets, subscribers, samplers -----------------------------------


async def api_json(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    data = None if body is None and method == "GET" else orjson.dumps(body)
    async with http.request(method, url, data=data, timeout=REQUEST_TIMEOUT) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {url}: {resp.status} {payload[:300]!r}")
        return orjson.loads(payload)


async def sessions_by_id(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    data = await api_json(http, "GET", f"{base}/api/sessions")
    return {s["sessionId"]: s for s in data["sessions"]}


async def pause_for(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass
class Controls:
    budget_raises: int = 0
    manual_pauses: int = 0
    manual_resumes: int = 0
    errors: list[str] = field(default_factory=list)


async def controller(
    http: aiohttp.ClientSession, base: str, stop: asyncio.Event, rng: random.Random, c: Controls
) -> None:
    """Every 3 s: raise the budget of some paused budgeted sessions; pause/resume MANUAL."""
    paused, flip_at = False, time.monotonic() + 8
    while not stop.is_set():
        await pause_for(stop, 3)
        try:
            sessions = await sessions_by_id(http, base)
            for sid in BUDGETED:
                s = sessions.get(sid)
                if s and s["paused"] and rng.random() < 0.5:
                    budget = s["spentUsd"] + BUDGET_STEP
                    await api_json(
                        http, "PUT", f"{base}/api/sessions/{sid}/budget", {"budgetUsd": budget}
                    )
                    c.budget_raises += 1
            if time.monotonic() >= flip_at or (stop.is_set() and paused):
                action = "resume" if paused else "pause"
                await api_json(http, "POST", f"{base}/api/sessions/{MANUAL}/{action}", {})
                paused = not paused
                c.manual_pauses += paused
                c.manual_resumes += not paused
                flip_at = time.monotonic() + (4 if paused else 11)
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
            c.errors.append(repr(exc)[:200])
    if paused:
        await api_json(http, "POST", f"{base}/api/sessions/{MANUAL}/resume", {})
        c.manual_resumes += 1


@dataclass
class SSEStats:
    joined: int = 0
    left: int = 0
    stalled: int = 0
    replays: int = 0
    events: int = 0
    types: Counter[str] = field(default_factory=Counter)
    ended_by_server: int = 0
    errors: list[str] = field(default_factory=list)
    out_of_order: int = 0
    filter_violations: int = 0
    replay_violations: int = 0
    last_id: int = 0


def parse_sse(buf: bytes) -> tuple[list[tuple[int, str, dict[str, Any]]], bytes]:
    """Complete events in ``buf`` as (id, type, data), and the incomplete rest."""
    *raw, rest = buf.split(b"\n\n")
    out = []
    for ev in raw:
        id_, type_, data = 0, "", None
        for line in ev.split(b"\n"):
            if line.startswith(b"id: "):
                id_ = int(line[4:])
            elif line.startswith(b"event: "):
                type_ = line[7:].decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
        if data is not None:
            out.append((id_, type_, data))
    return out, rest


async def sse_slot(
    http: aiohttp.ClientSession, base: str, stop: asyncio.Event, rng: random.Random, st: SSEStats
) -> None:
    """One subscriber after another: random filters, lifetimes, replays, some never read."""
    while not stop.is_set():
        params: list[tuple[str, str]] = []
        r = rng.random()
        if r < 0.35:
            params.append(("session", rng.choice(SESSIONS)))
        elif r < 0.6:
            params.append(("types", "token.usage,budget.paused,budget.resumed"))
        elif r < 0.7:
            params += [("session", rng.choice(BUDGETED)), ("session", MANUAL)]
            params.append(("types", "budget.warning,budget.paused,budget.resumed"))
        sessions = {v for k, v in params if k == "session"}
        types = {t for k, v in params if k == "types" for t in v.split(",")}
        headers = {}
        since = st.last_id if st.last_id and rng.random() < 0.3 else None
        if since is not None:
            headers["Last-Event-ID"] = str(since)
            st.replays += 1
        lifetime, stalled = rng.uniform(0.5, 8), rng.random() < 0.1
        st.joined += 1
        st.stalled += stalled
        last = since or 0
        try:
            async with asyncio.timeout(lifetime):
                async with http.get(
                    f"{base}/api/events", params=params, headers=headers, timeout=SSE_TIMEOUT
                ) as resp:
                    if resp.status != 200:
                        st.errors.append(f"status {resp.status}")
                        continue
                    if stalled:  # connected, never reads
                        await asyncio.sleep(lifetime + 1)
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        events, buf = parse_sse(buf + chunk)
                        for id_, type_, data in events:
                            st.events += 1
                            st.types[type_] += 1
                            st.out_of_order += id_ <= last
                            last = id_
                            st.last_id = max(st.last_id, id_)
                            bad = (sessions and data.get("sessionId") not in sessions) or (
                                types and type_ not in types
                            )
                            st.filter_violations += bool(bad)
                    st.ended_by_server += 1
        except TimeoutError:
            st.left += 1
        except aiohttp.ClientError as exc:
            st.errors.append(repr(exc)[:200])
        await pause_for(stop, rng.uniform(0, 0.5))


@dataclass
class Auditor:
    """One subscriber for the whole run: a final ``token.usage`` per row, same cost?

    Also keeps each session's ``sessionCostUsd`` (it must never go down) and the
    ``budget.paused`` events (how far past its budget a session got).
    """

    finals: dict[str, list[tuple[float | None, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    session_cost: dict[str, float] = field(default_factory=dict)
    cost_went_down: list[str] = field(default_factory=list)
    paused: list[dict[str, Any]] = field(default_factory=list)
    live: int = 0
    ended_by_server: bool = False
    error: str | None = None

    async def run(self, http: aiohttp.ClientSession, base: str, ready: asyncio.Event) -> None:
        try:
            url = f"{base}/api/events?types=token.usage,budget.paused"
            async with http.get(url, timeout=SSE_TIMEOUT) as resp:
                buf = b""
                async for chunk in resp.content.iter_any():
                    ready.set()  # ": connected" comes after the subscription
                    events, buf = parse_sse(buf + chunk)
                    for _, type_, data in events:
                        if type_ == "budget.paused":
                            self.paused.append(data)
                        elif data["final"]:
                            self.final(data)
                        else:
                            self.live += 1
                self.ended_by_server = True
        except aiohttp.ClientError as exc:
            self.error = repr(exc)[:200]
        finally:
            ready.set()

    def final(self, data: dict[str, Any]) -> None:
        self.finals[data["messageId"]].append((data["costUsd"], data["estimated"]))
        sid, cost = data["sessionId"], data["sessionCostUsd"]
        if cost < self.session_cost.get(sid, 0.0):
            self.cost_went_down.append(f"{sid}: {self.session_cost[sid]!r} → {cost!r}")
        self.session_cost[sid] = cost


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sampler(
    pid: int,
    t0: float,
    stop: asyncio.Event,
    out: list[dict[str, float]],
    requests: Callable[[], int],
) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, KeyError):
            out.append(
                {
                    "t": time.monotonic() - t0,
                    "rss_kb": status_kb(pid, "VmRSS"),
                    "fds": fd_count(pid),
                    "requests": requests(),
                }
            )
        await pause_for(stop, SAMPLE_EVERY_S)


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text → the sum of each sample name over its labels."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        out[name_labels.split("{", 1)[0]] += float(value)
    return out


def metric_by_label(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            for part in labels[len(name) + 1 : -1].split(","):
                k, _, v = part.partition("=")
                if k == label:
                    out[v.strip('"')] += float(value)
    return out


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, timeout=REQUEST_TIMEOUT) as resp:
        return await resp.text()


async def settle(http: aiohttp.ClientSession, base: str, limit: float = 20) -> tuple[str, float]:
    """Poll /metrics until no stream and no subscriber is left: (metrics, seconds taken)."""
    t0 = time.monotonic()
    while True:
        text = await get_text(http, f"{base}/metrics")
        m = metric_sums(text)
        idle = m["spendgate_active_streams"] == 0 and m["spendgate_event_subscribers"] == 0
        if idle or time.monotonic() - t0 > limit:
            return text, time.monotonic() - t0
        await asyncio.sleep(0.25)


# -- processes ---------------------------------------------------------------------------------


def spendgate_env(port: int, db: Path, upstream: Server) -> dict[str, str]:
    # No SPENDGATE_DEFAULT_SESSION_BUDGET_USD (bench.run's env filter drops any inherited
    # SPENDGATE_*): sessions are unlimited unless the soak puts a budget on them.
    return {
        "SPENDGATE_HOST": HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(db),
        "SPENDGATE_OPENAI_BASE_URL": upstream.url.rstrip("/"),
        "SPENDGATE_UPSTREAM_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    }


async def start_spendgate(tmp: Path, upstream: Server, name: str) -> Server:
    port = free_port()
    env = spendgate_env(port, tmp / "soak.db", upstream)
    argv = [sys.executable, "-m", "spendgate", "serve"]
    return await start_server(name, argv, f"http://{HOST}:{port}/healthz", tmp, env)


async def terminate(server: Server, timeout: float = 20) -> tuple[int | None, float]:
    """SIGTERM, then wait: (exit code, seconds to exit); killed after ``timeout``."""
    t0 = time.monotonic()
    if server.proc.returncode is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.proc.wait(), timeout)
        except TimeoutError:
            server.proc.kill()
            await server.proc.wait()
            return None, time.monotonic() - t0
    return server.proc.returncode, time.monotonic() - t0


# -- the run -------------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    upstream = await start_upstream(tmp)
    try:
        return await drive_spendgate(args, tmp, upstream)
    finally:
        await terminate(upstream)


async def drive_spendgate(args: argparse.Namespace, tmp: Path, upstream: Server) -> dict[str, Any]:
    res: dict[str, Any] = {"loadavg_start": _loadavg()}
    sg = await start_spendgate(tmp, upstream, "spendgate")
    base = sg.url
    res["pid"] = sg.pid
    duration = args.minutes * 60
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=0)
    http = aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT)
    try:
        for sid in BUDGETED:
            await api_json(
                http, "PUT", f"{base}/api/sessions/{sid}/budget", {"budgetUsd": BUDGET_STEP}
            )
        await api_json(http, "PUT", f"{base}/api/sessions/{MANUAL}/budget", {"budgetUsd": None})
        res["rss_idle_kb"] = status_kb(sg.pid, "VmRSS")

        auditor, ready = Auditor(), asyncio.Event()
        auditor_task = asyncio.create_task(auditor.run(http, base, ready))
        await asyncio.wait_for(ready.wait(), 10)

        t0 = time.monotonic()
        traffic = Traffic(base, args.seed, t0 + duration)
        stop, stop_sampler = asyncio.Event(), asyncio.Event()
        samples: list[dict[str, float]] = []
        controls, sse = Controls(), SSEStats()
        sampler_task = asyncio.create_task(
            sampler(sg.pid, t0, stop_sampler, samples, lambda: len(traffic.reqs))
        )
        side = [
            asyncio.create_task(controller(http, base, stop, random.Random(rng.random()), controls))
        ]
        side += [
            asyncio.create_task(sse_slot(http, base, stop, random.Random(rng.random()), sse))
            for _ in range(SSE_SLOTS)
        ]
        workers = [
            asyncio.create_task(traffic.worker(http, random.Random(rng.random())))
            for _ in range(args.workers)
        ]
        print(
            f"soak: {args.minutes:g} min, {args.workers} workers, seed {args.seed} ...", flush=True
        )
        progress = asyncio.create_task(report_progress(traffic, samples, t0, duration))
        await asyncio.gather(*workers)
        res["traffic_s"] = time.monotonic() - t0
        progress.cancel()
        stop.set()
        done, pending = await asyncio.wait(side, timeout=15)
        for task in pending:
            task.cancel()
        res["side_errors"] = [repr(t.exception()) for t in done if t.exception()]
        await asyncio.sleep(1.0)  # hung-up streams notice, rows and last events go out
        stop_sampler.set()
        await sampler_task
        res["rss_after_traffic_kb"] = status_kb(sg.pid, "VmRSS")
        res["fds_after_traffic"] = fd_count(sg.pid)

        # A leaked reservation would refuse a request that fits: raise each budgeted
        # session's budget a hair above what it spent, and send one request.
        sessions = await sessions_by_id(http, base)
        for sid in BUDGETED:
            budget = sessions[sid]["spentUsd"] + 1e-6
            await api_json(http, "PUT", f"{base}/api/sessions/{sid}/budget", {"budgetUsd": budget})
            await traffic.one(http, rng, PROBE, sid)
        await asyncio.sleep(0.5)
        res["metrics"] = await get_text(http, f"{base}/metrics")
        auditor_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await auditor_task
        res["metrics_end"], res["settle_s"] = await settle(http, base)
        res["api_sessions"] = await sessions_by_id(http, base)  # flushes first
        res["rss_end_kb"] = status_kb(sg.pid, "VmRSS")
        res["hwm_kb"] = status_kb(sg.pid, "VmHWM")
    finally:
        await http.close()
        res["exit_code"], res["exit_s"] = await terminate(sg)
        res["log"] = sg.log.read_text(errors="replace")

    # Totals must survive a restart on the same file.
    sg2 = await start_spendgate(tmp, upstream, "spendgate-restart")
    try:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http2:
            res["api_sessions_restart"] = await sessions_by_id(http2, sg2.url)
    finally:
        await terminate(sg2)
    res.update(
        reqs=traffic.reqs,
        samples=samples,
        controls=controls,
        sse=sse,
        auditor=auditor,
        duration_s=duration,
        loadavg_end=_loadavg(),
        db=tmp / "soak.db",
    )
    return res


async def report_progress(
    traffic: Traffic, samples: list[dict[str, float]], t0: float, duration: float
) -> None:
    while True:
        await asyncio.sleep(30)
        rss = samples[-1]["rss_kb"] / 1024 if samples else 0
        print(
            f"  {time.monotonic() - t0:5.0f}/{duration:.0f} s: {len(traffic.reqs):,} requests,"
            f" RSS {rss:.1f} MB",
            flush=True,
        )


# -- the audit -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    measured: str
    ok: bool
    details: list[str] = field(default_factory=list)


def audit(res: dict[str, Any]) -> tuple[list[Check], dict[str, Any]]:
    reqs: list[Req] = res["reqs"]
    con = sqlite3.connect(res["db"])
    con.row_factory = sqlite3.Row
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    rows = [dict(r) for r in con.execute("SELECT * FROM token_usage")]
    db_sessions = {r["id"]: dict(r) for r in con.execute("SELECT * FROM sessions")}
    con.close()
    by_fp: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_fp[row["key_fingerprint"]].append(row)
    checks: list[Check] = []
    info: dict[str, Any] = {"rows": rows, "integrity": integrity}

    # (1) one row per answered request that went upstream; none for a 402.
    answered = [r for r in reqs if r.status is not None]
    gave_up = [r for r in reqs if r.gave_up]
    # Each request that went upstream has one row: answered (but not 402) or given up on.
    upstream = [r for r in answered if r.status != 402] + gave_up
    refused = [r for r in answered if r.status == 402]
    missing = [r for r in upstream if len(by_fp.get(r.fingerprint, ())) == 0]
    dupes = [r for r in upstream if len(by_fp.get(r.fingerprint, ())) > 1]
    with_402 = [r for r in refused if by_fp.get(r.fingerprint)]
    known = {r.fingerprint for r in reqs}
    orphans = [row for fp, rs in by_fp.items() if fp not in known for row in rs]
    no_answer = [r for r in reqs if r.status is None and not r.gave_up]
    ok = len(rows) == len(upstream) and not (missing or dupes or with_402 or orphans)
    checks.append(
        Check(
            "rows on disk = requests answered that went upstream (one row each; none for a 402)",
            f"{len(rows):,} rows, {len(upstream):,} requests ({len(gave_up)} given up on before "
            f"an answer; +{len(refused):,} 402s); "
            f"{len(missing)} missing, {len(dupes)} duplicated, {len(orphans)} orphan, "
            f"{len(with_402)} rows for a 402",
            ok,
            [f"missing: #{r.n} {r.scenario} {r.session} status {r.status}" for r in missing[:5]]
            + [
                f"orphan row {row['id']} {row['session_id']} {row['status']}" for row in orphans[:5]
            ],
        )
    )
    checks.append(
        Check(
            "every request got an answer (a status) from spendgate (but those given up on)",
            f"{len(no_answer)} without one",
            not no_answer,
            [f"#{r.n} {r.scenario}: {r.error}" for r in no_answer[:5]],
        )
    )

    one_row = {r.fingerprint: by_fp[r.fingerprint][0] for r in upstream if r not in missing}
    hung = [r for r in upstream if r.hung_up]
    hung_not_aborted = [
        r for r in hung if r.fingerprint in one_row and not one_row[r.fingerprint]["aborted"]
    ]
    other_aborted = [
        r
        for r in upstream
        if not (r.hung_up or r.gave_up)
        and r.fingerprint in one_row
        and one_row[r.fingerprint]["aborted"]
    ]
    gave_up_aborted = sum(
        one_row[r.fingerprint]["aborted"] for r in gave_up if r.fingerprint in one_row
    )
    info["gave_up_aborted"] = gave_up_aborted
    checks.append(
        Check(
            "client hang-ups mid-stream marked aborted=1, and only they (clients that gave up "
            "before any answer: shown, not checked)",
            f"{len(hung):,} hang-ups: {len(hung) - len(hung_not_aborted):,} aborted; "
            f"{len(other_aborted)} other rows aborted; gave up before an answer: "
            f"{gave_up_aborted} of {len(gave_up)} aborted",
            not hung_not_aborted and not other_aborted,
            [
                f"#{r.n} {r.scenario}: aborted={one_row[r.fingerprint]['aborted']}"
                for r in (hung_not_aborted + other_aborted)[:5]
            ],
        )
    )
    complete = [
        one_row[r.fingerprint]
        for r in upstream
        if r.fingerprint in one_row
        and r.status == 200
        and BY_NAME[r.scenario].fault is None
        and not r.hung_up
    ]
    misbilled = [
        row
        for row in complete
        if (row["input_tokens"], row["output_tokens"], row["estimated"], row["cost_usd"])
        != FULL_ANSWER
    ]
    checks.append(
        Check(
            "complete answers billed from the provider's usage (42 in, 64 out, not estimated, "
            f"${FULL_ANSWER[3]:.7f})",
            f"{len(complete):,} complete answers, {len(misbilled)} billed otherwise",
            not misbilled,
            [
                f"{row['id']}: {row['input_tokens']} in, {row['output_tokens']} out, estimated "
                f"{row['estimated']}, ${row['cost_usd']}"
                for row in misbilled[:5]
            ],
        )
    )
    status_diff = [
        r
        for r in upstream
        if r.fingerprint in one_row
        and not r.gave_up
        and one_row[r.fingerprint]["status"] != r.status
    ]
    wrong_session = [
        r
        for r in upstream
        if r.fingerprint in one_row and one_row[r.fingerprint]["session_id"] != r.session
    ]
    checks.append(
        Check(
            "each row has the status and session its client saw",
            f"{len(status_diff)} status, {len(wrong_session)} session mismatches",
            not status_diff and not wrong_session,
            [
                f"#{r.n} {r.scenario}: client {r.status}, row {one_row[r.fingerprint]['status']}"
                for r in status_diff[:5]
            ],
        )
    )

    # (2) session totals: API (before shutdown) = the rows; the ledger agrees; restart too.
    api: dict[str, dict[str, Any]] = res["api_sessions"]
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for row in rows:
        sums[row["session_id"]] += row["cost_usd"] or 0.0
        counts[row["session_id"]] += 1
    client_counts = Counter(r.session for r in upstream)
    bad: list[str] = []
    for sid in sorted(set(api) | set(counts)):
        a = api.get(sid)
        if a is None:
            bad.append(f"{sid}: rows on disk but not in GET /api/sessions")
            continue
        total = a["totalCostUsd"] or 0.0
        if abs(total - sums[sid]) > COST_TOLERANCE:
            bad.append(f"{sid}: totalCostUsd {total!r} ≠ SUM(cost_usd) {sums[sid]!r}")
        if abs(a["spentUsd"] - sums[sid]) > COST_TOLERANCE:
            bad.append(f"{sid}: spentUsd (ledger) {a['spentUsd']!r} ≠ rows {sums[sid]!r}")
        if a["messageCount"] != counts[sid] or counts[sid] != client_counts[sid]:
            bad.append(
                f"{sid}: messageCount {a['messageCount']}, rows {counts[sid]}, "
                f"client {client_counts[sid]}"
            )
    total_cost = sum(sums.values())
    checks.append(
        Check(
            "per session: API totalCostUsd = SUM(cost_usd) of its rows = ledger spentUsd; "
            "messageCount = rows = client count",
            f"{len(api)} sessions, ${total_cost:.6f} in all; {len(bad)} mismatches",
            not bad,
            bad[:8],
        )
    )
    restart: dict[str, dict[str, Any]] = res["api_sessions_restart"]
    rbad = []
    for sid, a in api.items():
        b = restart.get(sid)
        if b is None:
            rbad.append(f"{sid} missing after restart")
            continue
        for k in ("spentUsd", "totalCostUsd", "messageCount", "budgetUsd", "paused"):
            x, y = a.get(k), b.get(k)
            same = abs((x or 0) - (y or 0)) <= COST_TOLERANCE if k.endswith("Usd") else x == y
            if not same:
                rbad.append(f"{sid}.{k}: {x!r} before, {y!r} after")
    dbbad = [
        sid
        for sid, a in api.items()
        if sid not in db_sessions or bool(db_sessions[sid]["paused"]) != a["paused"]
    ]
    checks.append(
        Check(
            "session totals, budgets and pauses survive a restart (and match the sessions table)",
            f"{len(rbad)} differences after restart, {len(dbbad)} with the table; "
            f"integrity_check {integrity}",
            not rbad and not dbbad and integrity == "ok",
            rbad[:5] + [f"sessions table differs for {sid}" for sid in dbbad[:5]],
        )
    )

    # (3) RSS flat.
    checks.append(rss_check(res, info))

    # (4) no 5xx but the injected ones; every answer well-formed; 402s where expected.
    unexpected = [r for r in answered if r.status != 402 and r.status != BY_NAME[r.scenario].expect]
    five = [r for r in unexpected if (r.status or 0) >= 500]
    checks.append(
        Check(
            "no 5xx other than the injected ones (and no other unexpected status)",
            f"{len(five)} unexpected 5xx, {len(unexpected) - len(five)} other unexpected",
            not unexpected,
            [f"#{r.n} {r.scenario} {r.session}: {r.status}" for r in unexpected[:5]],
        )
    )
    wrong = [r for r in answered if r.outcome != "ok" and not r.hung_up]
    stray_402 = [r for r in refused if r.session not in (*BUDGETED, MANUAL)]
    probes = [r for r in reqs if r.scenario == PROBE.name]
    probe_bad = [r for r in probes if r.status != 200]
    checks.append(
        Check(
            "answers well-formed (streams whole or ended by an in-band error; 402 bodies and "
            "headers; a JSON body the upstream cut short: a 502)",
            f"{len(wrong)} malformed",
            not wrong,
            [f"#{r.n} {r.scenario} {r.status}: {r.outcome}" for r in wrong[:5]],
        )
    )
    checks.append(
        Check(
            "402s only on budgeted or hand-paused sessions; no reservation leaked "
            "(a request that fits the budget is admitted after the traffic)",
            f"{len(stray_402)} stray 402s; probes: {', '.join(str(r.status) for r in probes)}",
            not stray_402 and not probe_bad and len(probes) == len(BUDGETED),
            [f"#{r.n} {r.session}: 402" for r in stray_402[:5]],
        )
    )

    # Extras: the event stream, the metrics and the process agree with the rows.
    checks.append(events_check(res, rows))
    checks += budget_checks(res)
    checks += metrics_checks(res, rows, reqs, total_cost)
    log = res["log"]
    bad_lines = [
        ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln or " CRITICAL " in ln
    ]
    info["log_warnings"] = sum(" WARNING " in ln for ln in log.splitlines())
    checks.append(
        Check(
            "clean shutdown on SIGTERM, no errors or tracebacks in spendgate's log",
            f"exit code {res['exit_code']} after {res['exit_s']:.2f} s; {len(bad_lines)} error "
            f"lines, {info['log_warnings']:,} warnings (the injected faults)",
            res["exit_code"] == 0 and not bad_lines,
            [ln[:240] for ln in bad_lines[:5]],
        )
    )
    return checks, info


def rss_check(res: dict[str, Any], info: dict[str, Any]) -> Check:
    samples = res["samples"]
    duration = res["duration_s"]
    warm = min(30.0, duration / 4)
    steady = [s for s in samples if s["t"] >= warm]
    third = (duration - warm) / 3
    first = [s["rss_kb"] for s in steady if s["t"] < warm + third]
    last = [s["rss_kb"] for s in steady if s["t"] >= warm + 2 * third]
    if not first or not last:
        return Check("RSS flat", "too few samples", False)
    a, b = statistics.median(first) / 1024, statistics.median(last) / 1024
    growth = (b - a) / a
    slope = _slope_mb_per_min(steady)
    slope_last = _slope_mb_per_min([s for s in steady if s["t"] >= warm + 2 * third])
    fd_first = statistics.median(s["fds"] for s in steady if s["t"] < warm + third)
    fd_last = statistics.median(s["fds"] for s in steady if s["t"] >= warm + 2 * third)
    info.update(
        rss_first_mb=a,
        rss_last_mb=b,
        rss_growth=growth,
        warm_s=warm,
        slope=slope,
        slope_last=slope_last,
        fd_first=fd_first,
        fd_last=fd_last,
    )
    return Check(
        f"RSS flat: median of the last third vs the first third after a {warm:.0f} s warm-up "
        f"(≤ {RSS_GROWTH_LIMIT:.0%} growth)",
        f"{a:.1f} → {b:.1f} MB ({b - a:+.2f} MB, {growth:+.1%}); trend {slope:+.2f} MB/min "
        f"({slope_last:+.2f} in the last third); open fds {fd_first:.0f} → {fd_last:.0f}",
        growth <= RSS_GROWTH_LIMIT,
    )


def _slope_mb_per_min(samples: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(samples) < 3:
        return float("nan")
    fit = statistics.linear_regression([s["t"] for s in samples], [s["rss_kb"] for s in samples])
    return fit.slope * 60 / 1024


def events_check(res: dict[str, Any], rows: list[dict[str, Any]]) -> Check:
    aud: Auditor = res["auditor"]
    ids = {row["id"]: row for row in rows}
    missing = [i for i in ids if i not in aud.finals]
    extra = [i for i in aud.finals if i not in ids]
    twice = [i for i, v in aud.finals.items() if len(v) > 1]
    cost = [i for i, v in aud.finals.items() if i in ids and v[0][0] != ids[i]["cost_usd"]]
    ok = not (missing or extra or twice or cost or aud.ended_by_server or aud.error)
    return Check(
        "a subscriber connected all along got exactly one final token.usage per row, "
        "with the row's cost",
        f"{len(aud.finals):,} finals for {len(rows):,} rows: {len(missing)} missing, "
        f"{len(extra)} extra, {len(twice)} repeated, {len(cost)} cost differences"
        + ("; dropped by the server" if aud.ended_by_server else "")
        + (f"; {aud.error}" if aud.error else ""),
        ok,
        [
            f"no final event for row {i} ({ids[i]['status']}, error {ids[i]['error']})"
            for i in missing[:5]
        ],
    )


def budget_checks(res: dict[str, Any]) -> list[Check]:
    aud: Auditor = res["auditor"]
    api: dict[str, dict[str, Any]] = res["api_sessions"]
    last = [
        f"{sid}: last event {cost!r}, spentUsd {api[sid]['spentUsd']!r}"
        for sid, cost in aud.session_cost.items()
        if abs(cost - api[sid]["spentUsd"]) > COST_TOLERANCE
    ]
    by_budget = [e for e in aud.paused if e["reason"] == "budget"]
    over = [e["spentUsd"] - e["budgetUsd"] for e in by_budget]
    worst = max(over, default=0.0)
    return [
        Check(
            "token.usage sessionCostUsd never goes down, and its last value = the session's "
            "spentUsd",
            f"{len(aud.cost_went_down)} decreases, {len(last)} last values off",
            not aud.cost_went_down and not last,
            (aud.cost_went_down + last)[:5],
        ),
        Check(
            "a session pauses less than one reservation past its budget (concurrent requests "
            f"reserve: < ${MAX_RESERVATION})",
            f"{len(by_budget)} budget pauses; overshoot at the pause max ${worst:.7f}, "
            f"median ${statistics.median(over) if over else 0:.7f}",
            worst < MAX_RESERVATION,
        ),
    ]


def metrics_checks(
    res: dict[str, Any], rows: list[dict[str, Any]], reqs: list[Req], cost: float
) -> list[Check]:
    m, m_end = metric_sums(res["metrics"]), metric_sums(res["metrics_end"])
    refused = sum(1 for r in reqs if r.status == 402)
    errs = metric_by_label(res["metrics"], "spendgate_upstream_errors_total", "kind")
    injected: Counter[str] = Counter(
        BY_NAME[r.scenario].upstream_error or ""
        for r in reqs
        if (r.gave_up or r.status not in (None, 402)) and BY_NAME[r.scenario].upstream_error
    )
    kinds = sorted(set(errs) | set(injected))
    checks = [
        Check(
            "metrics = rows: spendgate_requests_total, cost_usd_total, budget_rejections_total "
            "(402s), upstream_errors_total by kind (injected faults)",
            f"requests {m['spendgate_requests_total']:,.0f} / {len(rows):,} rows; cost "
            f"${m['spendgate_cost_usd_total']:.6f} / ${cost:.6f}; 402s "
            f"{m['spendgate_budget_rejections_total']:,.0f} / {refused:,}; errors "
            + ", ".join(f"{k} {errs.get(k, 0):.0f}/{injected.get(k, 0)}" for k in kinds),
            m["spendgate_requests_total"] == len(rows)
            and abs(m["spendgate_cost_usd_total"] - cost) <= COST_TOLERANCE
            and m["spendgate_budget_rejections_total"] == refused
            and all(errs.get(k, 0) == injected.get(k, 0) for k in kinds),
        ),
        Check(
            "gauges back to rest after the traffic: active streams 0; subscribers 0 once all "
            f"have left (within the {KEEPALIVE_S:g} s keep-alive); store queue 0, no rows dropped",
            f"active_streams {m['spendgate_active_streams']:.0f}; event_subscribers "
            f"{m['spendgate_event_subscribers']:.0f} with 1 connected, "
            f"{m_end['spendgate_event_subscribers']:.0f} {res['settle_s']:.1f} s after the "
            f"last left; store_queue_depth {m_end['spendgate_store_queue_depth']:.0f}, "
            f"store_dropped_rows {m_end['spendgate_store_dropped_rows_total']:.0f}",
            m["spendgate_active_streams"] == 0
            and m_end["spendgate_active_streams"] == 0
            and m_end["spendgate_event_subscribers"] == 0
            and res["settle_s"] <= KEEPALIVE_S + 1
            and m_end["spendgate_store_queue_depth"] == 0
            and m_end["spendgate_store_dropped_rows_total"] == 0,
        ),
    ]
    return checks


# -- the report --------------------------------------------------------------------------------


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def report(
    args: argparse.Namespace, res: dict[str, Any], checks: list[Check], info: dict[str, Any]
) -> str:
    reqs: list[Req] = res["reqs"]
    rows = info["rows"]
    by_fp = {row["key_fingerprint"]: row for row in rows}
    command = f"python -m bench.soak --minutes {args.minutes:g} --seed {args.seed}"
    if args.workers != 8:
        command += f" --workers {args.workers}"
    passed = all(c.ok for c in checks)
    elapsed = res["traffic_s"]
    lines = [
        "# spendgate soak test",
        "",
        f"Generated by `{command}` on {res['date']}: {elapsed:.0f} s of traffic, "
        f"{res['elapsed_s']:.0f} s in all. **{'All checks passed' if passed else 'FAILED'}.**",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines.append(
        f"| load average (1, 5, 15 min) | {res['loadavg_start']} at start, "
        f"{res['loadavg_end']} at end |"
    )
    lines += [
        "",
        "## Set-up",
        "",
        f"`python -m spendgate serve` with its defaults (SQLite in a temporary directory, "
        f"no default budget) and `SPENDGATE_UPSTREAM_IDLE_TIMEOUT_S={IDLE_TIMEOUT_S:g}`, in "
        "front of bench/fake_upstream.py (faults on request by the `X-Bench-Fault` header). "
        f"{args.workers} workers send one request at a time (0-150 ms apart) to "
        f"{len(SESSIONS)} sessions, half by the `/s/{{id}}/openai/...` path, half by the "
        f"`X-Spendgate-Session` header; sessions {', '.join(BUDGETED)} carry "
        f"${BUDGET_STEP} budgets (raised by ${BUDGET_STEP} now and then once paused), "
        f"{MANUAL} is paused by hand for 4 s every 15 s. Every request has its own API key, "
        "so its row is found by `key_fingerprint`. "
        f"{SSE_SLOTS} SSE subscribers join and leave `/api/events` continuously (random "
        "filters, 0.5-8 s lives, 30 % resume with `Last-Event-ID`, 10 % never read), and "
        "one stays connected all along. RSS (`VmRSS`) and open fds sampled every "
        f"{SAMPLE_EVERY_S:g} s.",
        "",
        "## Audit",
        "",
        "| check | measured | |",
        "|---|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c.name} | {c.measured} | {'ok' if c.ok else '**FAILED**'} |")
    for c in checks:
        if not c.ok and c.details:
            lines += ["", f"{c.name}:", ""] + [f"- {d}" for d in c.details]
    lines += [
        "",
        "## Traffic",
        "",
        f"{len(reqs):,} requests ({len(reqs) / elapsed:.1f}/s), "
        f"{sum(r.status == 402 for r in reqs):,} refused with 402, "
        f"{sum(r.hung_up for r in reqs):,} hung up by their client; {len(rows):,} rows.",
        "",
        "| scenario | what | requests | answers | rows | rows' `error` | aborted | estimated "
        "| cost USD |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for sc in (*SCENARIOS, PROBE):
        mine = [r for r in reqs if r.scenario == sc.name]
        statuses = Counter(r.status for r in mine)
        answers = ", ".join(
            f"{'gave up' if s is None else s}×{n}" for s, n in sorted(statuses.items(), key=str)
        )
        rs = [by_fp[r.fingerprint] for r in mine if r.fingerprint in by_fp]
        errors = Counter(row["error"] or "—" for row in rs)
        lines.append(
            f"| {sc.name} | {sc.what} | {len(mine):,} | {answers} | {len(rs):,} | "
            + ", ".join(f"{e}×{n}" for e, n in errors.most_common())
            + f" | {sum(row['aborted'] for row in rs):,} | {sum(row['estimated'] for row in rs):,}"
            f" | {sum(row['cost_usd'] or 0 for row in rs):.6f} |"
        )
    c: Controls = res["controls"]
    lines += [
        "",
        f"Budget raises: {c.budget_raises}; hand pauses/resumes of {MANUAL}: "
        f"{c.manual_pauses}/{c.manual_resumes}; 402s by session: "
        + ", ".join(
            f"{s} {n}"
            for s, n in sorted(Counter(r.session for r in reqs if r.status == 402).items())
        )
        + (f". Controller errors: {c.errors[:3]}" if c.errors else "."),
    ]
    lines += rss_section(res, info)
    s: SSEStats = res["sse"]
    aud: Auditor = res["auditor"]
    lines += [
        "",
        "## Live events",
        "",
        f"Churning subscribers: {s.joined:,} joined ({s.replays} with `Last-Event-ID`, "
        f"{s.stalled} never reading), {s.left:,} left on their own, {s.ended_by_server} ended "
        f"by the server, {len(s.errors)} errors; {s.events:,} events received ("
        + ", ".join(f"{t} {n:,}" for t, n in s.types.most_common())
        + f"); {s.out_of_order} ids out of order, {s.filter_violations} events outside the "
        f"subscriber's filter. The all-along subscriber: {len(aud.finals):,} final and "
        f"{aud.live:,} live `token.usage` events. After the last subscriber left, "
        f"`spendgate_event_subscribers` took {res['settle_s']:.1f} s to reach 0 (spendgate "
        "notices a subscriber has gone only when it next writes to it: an event its filter "
        f"matches, or the {KEEPALIVE_S:g} s keep-alive).",
        "",
        f"spendgate's log: {info['log_warnings']:,} warnings (the injected upstream faults).",
        "",
    ]
    return "\n".join(lines)


def rss_section(res: dict[str, Any], info: dict[str, Any]) -> list[str]:
    samples = res["samples"]
    lines = [
        "",
        "## Memory",
        "",
        f"RSS idle before traffic {_mb(res['rss_idle_kb'])} MB; after the traffic "
        f"{_mb(res['rss_after_traffic_kb'])} MB; at the end {_mb(res['rss_end_kb'])} MB; peak "
        f"(VmHWM) {_mb(res['hwm_kb'])} MB. Open fds after the traffic: "
        f"{res['fds_after_traffic']}.",
    ]
    if "rss_first_mb" in info:
        lines.append(
            f"Median RSS after the {info['warm_s']:.0f} s warm-up: first third "
            f"{info['rss_first_mb']:.1f} MB, last third {info['rss_last_mb']:.1f} MB "
            f"({info['rss_last_mb'] - info['rss_first_mb']:+.2f} MB, "
            f"{info['rss_growth']:+.1%}); least-squares trend {info['slope']:+.2f} MB/min "
            f"after the warm-up, {info['slope_last']:+.2f} MB/min in the last third. Part of "
            "any growth is SQLite's page cache (its default, 2 MiB per connection) filling "
            "as the API reads `token_usage`; it stops there."
        )
    lines += ["", "| t (s) | requests | RSS MB | open fds |", "|---:|---:|---:|---:|"]
    step = max(1, round(15 / SAMPLE_EVERY_S))
    for smp in samples[::step]:
        lines.append(
            f"| {smp['t']:.0f} | {smp['requests']:,.0f} | {_mb(smp['rss_kb'])} | {smp['fds']:.0f} |"
        )
    return lines


# -- main --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    t0 = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.keep:
        tmp = Path(tempfile.mkdtemp(prefix="spendgate-soak-"))
        res = await drive(args, tmp)
        print(f"kept {tmp} (database, logs)")
    else:
        with tempfile.TemporaryDirectory(prefix="spendgate-soak-") as name:
            res = await drive(args, Path(name))
            res["checks"], res["info"] = audit(res)  # while the database still exists
    res["date"], res["elapsed_s"] = date, time.monotonic() - t0
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="how long the traffic runs")
    p.add_argument("--seed", type=int, default=1, help="random seed of the traffic mix")
    p.add_argument("--workers", type=int, default=8, help="concurrent clients")
    p.add_argument("--out", type=Path, default=BENCH / "soak.md", help="the Markdown report")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if not 0 < args.minutes <= 30 or not 1 <= args.workers <= 64:
        p.error("--minutes must be in (0, 30] and --workers in [1, 64]")
    res = asyncio.run(run(args))
    if "checks" not in res:
        res["checks"], res["info"] = audit(res)
    text = report(args, res, res["checks"], res["info"])
    args.out.write_text(text)
    print(text)
    return 0 if all(c.ok for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
