"""bench/ runs end to end on a tiny load and produces numbers (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def test_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    out, raw = tmp_path / "results.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(raw.read_text())

    for key in ("floor/json", "floor/stream", "spendgate/json", "spendgate/stream"):
        row = results["rows"][key]
        assert row["peak_rss_kb"] > 0, key
        for run in row["runs"]:
            assert run["errors"] == 0, (key, run["first_errors"])
            assert run["requests"] > 0 and run["rps"] > 0, key
            assert _number(run["p50_ms"]) and _number(run["p99_ms"]), key
            assert _number(run["cpu_us_per_req"]), key

    for name in ("floor", "spendgate"):
        hold = results["hold"][name]
        assert hold["completed"] == hold["streams"], hold
        assert hold["rss_open_kb"] > 0
    assert results["hold"]["spendgate"]["active_streams_gauge"] is not None

    sse = results["sse"]
    assert sse["connected"] == sse["subscribers"]
    assert sse["events"] > 0 and _number(sse["p99_ms"])

    store = results["store"]
    assert store["stored_rows"] == store["expected"] > 0
    assert store["sustained"]["committed_rows_per_s"] > 0

    assert len(results["targets"]) == 10
    text = out.read_text()
    assert "## Targets" in text and "CPU µs/req" in text and "aiohttp" in text
