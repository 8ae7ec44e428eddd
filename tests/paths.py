"""Where the vendored recordings and price data live (``tests/fixtures``, see its README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PRICE_DATA = FIXTURES / "prices" / "model_prices_and_context_window.json"


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = orjson.loads((FIXTURES / "MANIFEST.json").read_bytes())
    return entries
