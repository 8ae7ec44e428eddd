"""Wire-format adapters, one module per provider family."""

from __future__ import annotations

from spendgate.providers._api import Adapter
from spendgate.providers.anthropic import AnthropicAdapter
from spendgate.providers.gemini import GeminiAdapter
from spendgate.providers.ollama import OllamaAdapter
from spendgate.providers.openai import OpenAIAdapter

_openai = OpenAIAdapter()

ADAPTERS: dict[str, Adapter] = {
    "openai": _openai,
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "ollama": OllamaAdapter(),
    "azure": _openai,  # Azure OpenAI: same wire format, deployment in the path
    "openai_compatible": _openai,  # OpenRouter, Groq, DeepSeek, vLLM, ...
}
"""Every built-in wire format by the name routes use; adapters are stateless."""


def get_adapter(name: str) -> Adapter:
    """The adapter a route names; an unknown name is a configuration error."""
    try:
        return ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise KeyError(f"unknown adapter {name!r}; known adapters: {known}") from None
