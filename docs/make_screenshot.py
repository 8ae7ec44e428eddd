"""Regenerate docs/dashboard.png and docs/dashboard-400.png, the README's screenshots of
the live dashboard (desktop, and 400 px wide).

It runs the browser tests that drive real traffic through a real proxy into the page
in headless Chromium, and keeps their screenshots:

    python docs/make_screenshot.py

Needs what the browser tests need: Debian's ``chromium`` (or ``SPENDGATE_CHROMIUM``)
and the ``playwright`` Python package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = {
    "SPENDGATE_DASHBOARD_SCREENSHOT": (
        ROOT / "docs" / "dashboard.png",
        "tests/test_dashboard.py::test_screenshot_of_a_few_sessions",
    ),
    "SPENDGATE_DASHBOARD_SCREENSHOT_NARROW": (
        ROOT / "docs" / "dashboard-400.png",
        "tests/test_dashboard.py::test_usable_at_400_px",
    ),
}


def main() -> int:
    for variable, (target, test) in SHOTS.items():
        env = {**os.environ, variable: str(target)}
        before = target.stat().st_mtime_ns if target.exists() else None
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", test]
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        if code != 0:
            return code
        if not target.exists() or target.stat().st_mtime_ns == before:
            print("no screenshot written: the browser test was skipped (see its reason above)")
            return 1
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
