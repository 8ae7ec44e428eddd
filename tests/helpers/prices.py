"""Looking up a price that a test expects to be there."""

from __future__ import annotations

from spendgate.pricing import ModelPrice, PriceTable


def found(table: PriceTable, model: str, provider: str | None = None) -> ModelPrice:
    """``table.resolve(model, provider)``, failing the test (naming the model) on a miss."""
    price = table.resolve(model, provider)
    assert price is not None, model
    return price
