"""Where the shared recordings and price data live (``../shared`` beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

SHARED = Path(
    os.environ.get("SPENDGATE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")
)
FIXTURES = SHARED / "fixtures"
PRICE_DATA = SHARED / "data" / "model_prices_and_context_window.json"


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = orjson.loads((FIXTURES / "MANIFEST.json").read_bytes())
    return entries
