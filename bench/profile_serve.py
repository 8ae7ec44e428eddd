"""Profile spendgate under load: where does its CPU go? ``python -m bench.profile_serve``.

Starts the fake upstream and ``spendgate serve`` (real defaults, as bench/run.py does),
runs a load in its own process, and samples the spendgate process with py-spy
(``pip install py-spy``) for ``--seconds``. Without py-spy, spendgate runs under
cProfile instead (this file's ``--cprofile-serve`` wrapper) and the report is pstats'.
Writes a summary (self time per function, time per spendgate function including what
it calls, time attributed to the innermost spendgate frame) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import pstats
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run as bench

TOP = 30


OWNERS = (
    ("spendgate/", "spendgate"),
    ("floor_proxy.py", "floor proxy"),
    ("aiohttp/", "aiohttp"),
    ("multidict/", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("prometheus_client/", "prometheus_client"),
    ("aiosqlite/", "aiosqlite (writer thread)"),
    ("selector_events.py", "asyncio socket I/O"),
    ("selectors.py", "asyncio socket I/O"),
    ("asyncio/", "asyncio"),
)


def owner(frame: str) -> str:
    for fragment, name in OWNERS:
        if fragment in frame:
            return name
    return "other"


def summarize_raw(path: Path, requests: float = 0) -> str:
    """py-spy's raw (collapsed stacks) output, summarized."""
    total = 0
    owners: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_time[frames[-1]] += n
        owners[owner(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
        for frame in reversed(frames):
            if any(m in frame for m in ("spendgate/", "floor_proxy.py")) and not any(
                m in frame for m in ("__main__", "cli.py", "run_app", "main (")
            ):
                innermost[frame] += n
                modules[frame.split("(", 1)[1].split(":", 1)[0]] += n
                break
    if not total:
        return "no samples\n"

    def pct(n: int) -> str:
        return f"{n / total * 100:5.1f}%"

    out = [f"{total} samples (busy only)", "", "## Self time by owner of the innermost frame", ""]
    for name, n in owners.most_common():
        per = f"  ({n / requests * 1000:7.1f} samples per 1000 requests)" if requests else ""
        out.append(f"{pct(n)}  {name:<28}{per}")
    out += ["", "## Self time, top functions", ""]
    out += [f"{pct(n)}  {name}" for name, n in self_time.most_common(TOP)]
    out += ["", "## spendgate functions, including what they call", ""]
    spend = [(k, v) for k, v in inclusive.most_common() if "spendgate/" in k or "floor" in k]
    out += [f"{pct(n)}  {name}" for name, n in spend if n / total >= 0.005][: TOP * 2]
    out += ["", "## Time under the innermost spendgate frame (its own code + libs it calls)", ""]
    out += [f"{pct(n)}  {name}" for name, n in innermost.most_common(TOP)]
    out += ["", "## ... by spendgate module", ""]
    out += [f"{pct(n)}  {name}" for name, n in modules.most_common()]
    return "\n".join(out) + "\n"


def summarize_pstats(path: Path) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(TOP)
    stats.sort_stats("cumulative").print_stats("spendgate", TOP)
    return buf.getvalue()


async def profile(args: argparse.Namespace) -> str:
    bench.raise_nofile()
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if args.target == "floor" and not pyspy:
        raise SystemExit("profiling the floor proxy needs py-spy")
    if args.profiler == "cprofile":
        pyspy = None
    elif args.profiler == "py-spy" and not pyspy:
        raise SystemExit("py-spy not found: pip install py-spy (or use --profiler cprofile)")
    with tempfile.TemporaryDirectory(prefix="spendgate-profile-") as tmpname:
        tmp = Path(tmpname)
        upstream = await bench.start_upstream(tmp)
        servers = [upstream]
        try:
            stats_file = tmp / "spendgate.pstats"
            if args.target == "floor":
                spendgate = await bench.start_floor(tmp, upstream)
            elif pyspy:
                spendgate = await bench.start_spendgate(tmp, upstream)
            else:
                spendgate = await start_cprofiled(tmp, upstream, stats_file)
            servers.append(spendgate)
            await bench.load(spendgate.url, args.mode, 300, args.concurrency)  # warm up
            n = 10_000_000
            load = asyncio.create_task(
                bench.load(spendgate.url, args.mode, n, args.concurrency, duration=args.seconds + 2)
            )
            if pyspy:
                raw = tmp / "profile.txt"
                proc = await asyncio.create_subprocess_exec(
                    pyspy, "record", "--pid", str(spendgate.pid), "--duration",
                    str(int(args.seconds)), "--rate", "250", "--format", "raw",
                    "--output", str(raw), "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.wait_for(proc.wait(), args.seconds + 60)
                result = await load
                summary = summarize_raw(raw, result["rps"] * int(args.seconds))
            else:
                result = await load
                spendgate.proc.send_signal(signal.SIGINT)
                await asyncio.wait_for(spendgate.proc.wait(), 30)
                summary = summarize_pstats(stats_file)
        finally:
            for server in reversed(servers):
                await bench.stop_server(server)
    head = (
        f"# {args.target} profile: {args.mode} load, {args.concurrency} clients, "
        f"{'py-spy' if pyspy else 'cProfile'}\n\n"
        f"load: {result['requests']} requests, {result['rps']:.0f} req/s, "
        f"p50 {result['p50_ms']:.2f} ms\n\n"
    )
    return head + "```\n" + summary + "```\n"


async def start_cprofiled(tmp: Path, upstream: bench.Server, stats: Path) -> bench.Server:
    """spendgate serve under cProfile, through this file's ``--cprofile-serve`` mode."""
    port = bench.free_port()
    env = {
        "SPENDGATE_HOST": bench.HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp / "spendgate.db"),
        "SPENDGATE_OPENAI_BASE_URL": upstream.url.rstrip("/"),
        "SPENDGATE_DEFAULT_SESSION_BUDGET_USD": "1000000",
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "--cprofile-serve", str(stats)]
    health = f"http://{bench.HOST}:{port}/healthz"
    return await bench.start_server(
        "spendgate", argv, health, tmp, env, base_path=bench.SPENDGATE_PATH
    )


def cprofile_serve(stats: Path) -> None:
    from spendgate.cli import main as spendgate_main

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        spendgate_main(["serve"])
    finally:
        profiler.disable()
        profiler.dump_stats(str(stats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("stream", "json"), default="stream")
    p.add_argument("--target", choices=("spendgate", "floor"), default="spendgate")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "profile.md")
    p.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto")
    p.add_argument("--cprofile-serve", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cprofile_serve:
        cprofile_serve(args.cprofile_serve)
        return
    text = asyncio.run(profile(args))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
