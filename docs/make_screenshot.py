"""Regenerate docs/dashboard.png, the README's screenshot of the live dashboard.

It runs the browser test that drives real traffic through a real proxy into the page
in headless Chromium, and keeps that test's screenshot:

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
TARGET = ROOT / "docs" / "dashboard.png"


def main() -> int:
    env = {**os.environ, "SPENDGATE_DASHBOARD_SCREENSHOT": str(TARGET)}
    test = "tests/test_dashboard.py::test_screenshot_of_a_few_sessions"
    before = TARGET.stat().st_mtime_ns if TARGET.exists() else None
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", test], cwd=ROOT, env=env)
    if code != 0:
        return code
    if not TARGET.exists() or TARGET.stat().st_mtime_ns == before:
        print("no screenshot written: the browser test was skipped (see its reason above)")
        return 1
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
