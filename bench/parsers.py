"""The response parsers alone, without the proxy: ``python -m bench.parsers``.

``bench.instructions`` counts a whole proxied request, so a change to a parser drowns
in (and is confounded by) everything else the proxy does, and others' changes to it.
This feeds recorded and synthetic bodies straight into the adapters' parsers (and the
OpenAI usage-chunk filter), the way the meter does: piece by piece, ``settle()`` now
and then for the live estimate, ``close()``, then ``usage`` and ``model`` are read (and
``output_chars``, after ``settle()``, only when no usage came: it feeds an estimate).

Workloads (one iteration each):

- ``recordings-events``: every recording in tests/fixtures (Bedrock has no adapter),
  streams cut at their event boundaries (one event per piece, as a streaming upstream
  usually writes them), JSON bodies through ``feed_whole``;
- ``recordings-4k``: the same recordings in 4 KiB pieces (a busy socket's reads);
- ``fake-stream``: bench/fake_upstream.py's 64-chunk stream with ``"usage":null`` on
  every chunk (what spendgate's include_usage rewrite gets back), one event per piece,
  with a ``settle()`` and a read of the numbers every 16 pieces (the live estimate);
- ``fake-stream-8``: that stream in pieces of 8 events; ``fake-stream-1``: all at once;
- ``fake-json``: bench/fake_upstream.py's completion body through ``feed_whole``;
- ``filter``: the usage-chunk filter over the fake stream, one event per piece;
- ``gemini-array``: the Gemini recording re-framed as a JSON array, in 512-byte pieces.

Two measures. By default, wall time per iteration (``perf_counter_ns``, the best of
several rounds: it swings with the machine). With ``--callgrind``, instructions: each
workload runs in a child under ``valgrind --tool=callgrind`` that warms every workload
once and then runs the measured one N times (at least ``--iterations``, more for the
short ones); a child that runs it 0 times gives the fixed cost (start-up, imports,
warm-up), and the difference over N is per iteration. The children run with a fixed
hash seed, so the counts repeat to within a fraction of a percent.

    python -m bench.parsers [--rounds 7] [--callgrind [--iterations 30]] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.paths import FIXTURES, manifest

from bench.fake_upstream import completion_body, stream_chunks
from spendgate.providers import get_adapter
from spendgate.providers._api import Adapter, RequestInfo

LIVE_EVERY = 16
"""Pieces between live estimates in ``fake-stream`` (the meter's throttle is by time;
at OpenAI's pace 16 chunks is about its default 250 ms)."""

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _events(data: bytes, ndjson: bool) -> list[bytes]:
    """``data`` cut after each event's blank line (or each line, for NDJSON)."""
    if ndjson:
        return [line + b"\n" for line in data.split(b"\n") if line]
    pieces, at = [], 0
    for m in _EVENT_END.finditer(data):
        pieces.append(data[at : m.end()])
        at = m.end()
    if at < len(data):
        pieces.append(data[at:])
    return pieces


def _sized(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Recording:
    __slots__ = ("adapter", "content_type", "data", "events", "info", "streamed")

    def __init__(self, entry: dict[str, Any]) -> None:
        family = entry["api"].split(".", 1)[0]
        self.adapter: Adapter = get_adapter({"vertexai": "gemini"}.get(family, family))
        url = urlsplit(entry["request_url"])
        self.info: RequestInfo = self.adapter.inspect(
            entry["request_method"],
            url.path,
            dict(parse_qsl(url.query)),
            (FIXTURES / entry["request_file"]).read_bytes(),
            inject_stream_usage=False,
        )
        self.content_type = entry["content_type"] or ""
        self.data = (FIXTURES / entry["file"]).read_bytes()
        self.streamed = bool(entry["stream"])
        self.events = _events(self.data, family == "ollama")


RECORDINGS = [Recording(e) for e in manifest() if not e["file"].startswith("bedrock/")]
_CHAT = get_adapter("openai")
FAKE_INFO = _CHAT.inspect(
    "POST",
    "/v1/chat/completions",
    {},
    b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}',
    inject_stream_usage=True,
)
FAKE_EVENTS = stream_chunks(usage_null=True)
FAKE_STREAM = b"".join(FAKE_EVENTS)
FAKE_8 = [b"".join(FAKE_EVENTS[i : i + 8]) for i in range(0, len(FAKE_EVENTS), 8)]
FAKE_JSON = completion_body()
JSON_INFO = FAKE_INFO._replace(stream=False, strip_usage_chunk=False)


def _gemini_array() -> bytes:
    sse = (FIXTURES / "gemini/stream_gemini-2.0-flash-exp.sse").read_bytes()
    elements = [line[6:] for line in sse.split(b"\r\n") if line.startswith(b"data: ")]
    return b"[" + b"\r\n,".join(elements * 8) + b"]"


GEMINI = get_adapter("gemini")
GEMINI_INFO = RequestInfo(operation="stream_generate_content")
GEMINI_PIECES = _sized(_gemini_array(), 512)
_sink: list[object] = []


def _read(parser: Any) -> None:
    """The numbers, as the meter reads them at the end: ``usage`` and ``model``, and the
    estimate's ``output_chars`` (after ``settle``) only when no usage was reported."""
    usage = parser.usage
    if usage is None:
        parser.settle()
        _sink.append((usage, parser.model, parser.output_chars))
    else:
        _sink.append((usage, parser.model))


def _estimate(parser: Any) -> None:
    """A live estimate mid-stream (``Meter.estimated_counts``)."""
    parser.settle()
    _sink.append((parser.usage, parser.model, parser.output_chars))


def recordings(pieces_of: Callable[[Recording], list[bytes]]) -> Callable[[], None]:
    def run() -> None:
        for rec in RECORDINGS:
            parser = rec.adapter.parser(rec.info, 200, rec.content_type)
            if not rec.streamed:
                parser.feed_whole(rec.data)
            else:
                for piece in pieces_of(rec):
                    parser.feed(piece)
                parser.close()
            _read(parser)

    return run


def fake_stream(pieces: list[bytes], live: bool) -> Callable[[], None]:
    def run() -> None:
        parser = _CHAT.parser(FAKE_INFO, 200, "text/event-stream")
        for n, piece in enumerate(pieces, 1):
            parser.feed(piece)
            if live and n % LIVE_EVERY == 0:
                _estimate(parser)
        parser.close()
        _read(parser)

    return run


def fake_json() -> None:
    parser = _CHAT.parser(JSON_INFO, 200, "application/json")
    parser.feed_whole(FAKE_JSON)
    _read(parser)


def usage_filter() -> None:
    f = _CHAT.output_filter(FAKE_INFO)
    assert f is not None
    out = [f.feed(piece) for piece in FAKE_EVENTS]
    out.append(f.close())
    _sink.append(out)


def gemini_array() -> None:
    parser = GEMINI.parser(GEMINI_INFO, 200, "application/json")
    for piece in GEMINI_PIECES:
        parser.feed(piece)
    parser.close()
    _read(parser)


WORKLOADS: dict[str, Callable[[], None]] = {
    "recordings-events": recordings(lambda r: r.events),
    "recordings-4k": recordings(lambda r: _sized(r.data, 4096)),
    "fake-stream": fake_stream(FAKE_EVENTS, live=True),
    "fake-stream-8": fake_stream(FAKE_8, live=False),
    "fake-stream-1": fake_stream([FAKE_STREAM], live=False),
    "fake-json": fake_json,
    "filter": usage_filter,
    "gemini-array": gemini_array,
}


def wall(name: str, rounds: int) -> float:
    """Best-of-rounds nanoseconds per iteration; each round lasts about 0.2 s."""
    fn = WORKLOADS[name]
    fn()
    t0 = time.perf_counter_ns()
    fn()
    n = max(1, int(2e8 / max(1, time.perf_counter_ns() - t0)))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
        _sink.clear()
    return best


def child(name: str, iterations: int) -> None:
    for fn in WORKLOADS.values():
        fn()  # every child does the same warm-up, so the 0-iteration child is the base
    fn = WORKLOADS[name]
    for _ in range(iterations):
        fn()


def callgrind_total(tmp: Path, name: str, iterations: int) -> int:
    out = tmp / f"callgrind.{name}.{iterations}"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "bench.parsers",
        "--child",
        name,
        "--iterations",
        str(iterations),
    ]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict and set layouts each run
    subprocess.run(cmd, check=True, capture_output=True, cwd=root, env=env)
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--callgrind", action="store_true", help="count instructions instead")
    p.add_argument("--iterations", type=int, default=30, help="measured runs per child")
    p.add_argument("--only", action="append", choices=sorted(WORKLOADS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.iterations)
        return 0
    names = args.only or list(WORKLOADS)
    if not args.callgrind:
        print("| workload | µs per iteration (best of rounds) |\n|---|---:|")
        for name in names:
            print(f"| {name} | {wall(name, args.rounds) / 1e3:,.1f} |")
        return 0
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt install valgrind)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="spendgate-parsers-") as d:
        tmp = Path(d)
        base = callgrind_total(tmp, names[0], 0)
        print("| workload | instructions per iteration |\n|---|---:|")
        for name in names:
            # At least ~0.2 s of native work per child, so the fixed cost's jitter
            # (a few thousand instructions) is small beside it.
            n = max(args.iterations, int(2e8 / wall(name, 1)))
            per = (callgrind_total(tmp, name, n) - base) / n
            print(f"| {name} | {per / 1e3:,.1f}k |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
