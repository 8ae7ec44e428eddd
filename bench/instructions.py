"""Instructions per request, counted by valgrind: ``python -m bench.instructions``.

CPU seconds from /proc swing by ±15 % between runs on a shared 2-core machine, which
hides any change smaller than that. Instruction counts do not swing: callgrind counts
every instruction the proxy process executes (all its threads: the event loop and the
SQLite writer), whatever else the machine is doing. So this is the tool for A/B work on
the hot path; ``bench.run`` stays the measure of time.

Each proxy (the floor and ``spendgate serve`` with its real defaults, as in bench/run.py)
runs under ``valgrind --tool=callgrind`` with counting switched off; after a warm-up,
counting is switched on for exactly the measured requests and off again. The fake
upstream and the load generator run natively. Under valgrind a proxy is ~50× slower,
so pieces of a stream coalesce more than they would natively: the per-request work is
exact, the per-chunk share is a lower bound.

    python -m bench.instructions [--json-requests 300] [--stream-requests 100]
                                 [--budgets session|all|none]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run as bench

WARMUP = 100


async def count(
    tmp: Path, upstream: bench.Server, proxy: str, mode: str, requests: int, budgets: str
) -> float:
    """Instructions per request of one proxy process, in one mode."""
    out = tmp / f"callgrind.{proxy}.{mode}"
    valgrind = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    if proxy == "floor":
        server = await bench.start_floor(tmp, upstream, f"{proxy}-{mode}", wrap=valgrind)
    else:
        server = await bench.start_spendgate(
            tmp, upstream, f"{proxy}-{mode}", wrap=valgrind, budgets=budgets
        )
    control = ("callgrind_control", "-i")
    try:
        await bench.load(server.url, mode, WARMUP, 16)
        subprocess.run([*control, "on", str(server.pid)], check=True, capture_output=True)
        await bench.load(server.url, mode, requests, 16)
        await asyncio.sleep(0.5)  # let the writer commit what the requests queued
        subprocess.run([*control, "off", str(server.pid)], check=True, capture_output=True)
    finally:
        await bench.stop_server(server)
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total / requests


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spendgate-instr-") as name:
        tmp = Path(name)
        upstream = await bench.start_upstream(tmp)
        try:
            for mode, n in (("json", args.json_requests), ("stream", args.stream_requests)):
                floor, spendgate = await asyncio.gather(  # two cores: one proxy each
                    count(tmp, upstream, "floor", mode, n, args.budgets),
                    count(tmp, upstream, "spendgate", mode, n, args.budgets),
                )
                counts[mode] = {"floor": floor, "spendgate": spendgate}
        finally:
            await bench.stop_server(upstream)
    return counts


def report(counts: dict[str, dict[str, float]]) -> str:
    lines = [
        "| mode | floor | spendgate | spendgate − floor | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, c in counts.items():
        f, s = c["floor"] / 1e3, c["spendgate"] / 1e3
        lines.append(f"| {mode} | {f:,.0f}k | {s:,.0f}k | {s - f:+,.0f}k | {s / f:.2f}× |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-requests", type=int, default=300)
    p.add_argument("--stream-requests", type=int, default=100)
    p.add_argument(
        "--budgets",
        choices=tuple(bench.BUDGETS),
        default="session",
        help="which budgets requests are held to (bench/run.py BUDGETS; default session)",
    )
    args = p.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (apt install valgrind)", file=sys.stderr)
        return 1
    counts = asyncio.run(run(args))
    print("Instructions per request (callgrind, all threads of the proxy process)\n")
    print(report(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
