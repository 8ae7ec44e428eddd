"""spendgate: a transparent metering proxy for LLM APIs."""

__version__ = "0.1.0"
