"""``ledger_factory``: the memory ledger by default, Redis when configured, and the
one-line refusals of settings that cannot share a budget (a real ``spendgate serve``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.redis_server import free_port


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SPENDGATE_PORT": str(free_port()),
            "SPENDGATE_DB_PATH": str(tmp_path / "spendgate.db"), **env}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "spendgate", "serve"],
        env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_redis_with_a_sqlite_store_is_refused_in_one_line(tmp_path: Path) -> None:
    done = serve(tmp_path, SPENDGATE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "spendgate: SPENDGATE_REDIS_URL shares budgets between replicas, but each would keep "
        "its own SQLite rows: set SPENDGATE_STORE_URL=postgresql://... as well"
    ]


def test_an_unreachable_redis_stops_start_up_in_one_line(tmp_path: Path, pg_url: str) -> None:
    port = free_port()  # nothing listens there
    done = serve(
        tmp_path,
        SPENDGATE_STORE_URL=pg_url,
        SPENDGATE_REDIS_URL=f"redis://:secret-pw@127.0.0.1:{port}/0",
    )
    assert done.returncode == 1
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("spendgate:")]
    assert line.startswith(f"spendgate: cannot reach Redis at redis://:***@127.0.0.1:{port}/0")
    assert "secret-pw" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
