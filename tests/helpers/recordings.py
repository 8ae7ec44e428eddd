"""The recordings as replay cases: each manifest entry with its adapter, request facts
and body, and the usage spendgate must report for it (mapped from the provider's raw
numbers independently of the adapters). Shared by the replay and the through-the-proxy
tests."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from spendgate.providers import get_adapter
from spendgate.providers._api import Adapter, RequestInfo, ResponseParser
from spendgate.settings import RouteConfig
from spendgate.usage import Extras, Usage
from tests.paths import FIXTURES, manifest
from tests.upstream import FakeUpstream, Reply

if TYPE_CHECKING:
    from tests.conftest import StartProxy

ENTRIES = [e for e in manifest() if not e["file"].startswith("bedrock/")]  # no adapter yet


def adapter_for(api: str) -> Adapter:
    family = api.split(".", 1)[0]
    return get_adapter({"vertexai": "gemini", "azure": "azure"}.get(family, family))


@dataclass(frozen=True)
class Case:
    entry: dict[str, Any]
    adapter: Adapter
    info: RequestInfo
    data: bytes

    @property
    def name(self) -> str:
        return str(self.entry["file"])

    def parser(self) -> ResponseParser:
        return self.adapter.parser(self.info, 200, self.entry["content_type"] or "")

    def replay(self, pieces: list[bytes]) -> ResponseParser:
        parser = self.parser()
        for piece in pieces:
            parser.feed(piece)
        parser.close()
        parser.settle()  # output_chars may be counted only when asked (an estimate asks)
        return parser


def make_case(entry: dict[str, Any]) -> Case:
    adapter = adapter_for(entry["api"])
    url = urlsplit(entry["request_url"])
    info = adapter.inspect(
        entry["request_method"],
        url.path,
        dict(parse_qsl(url.query)),
        (FIXTURES / entry["request_file"]).read_bytes(),
        inject_stream_usage=False,
    )
    return Case(entry, adapter, info, (FIXTURES / entry["file"]).read_bytes())


CASES = [make_case(e) for e in ENTRIES]


_STANDARD = ("standard", "default")
_TIERS = {
    # the service tier each recording states beside its final usage (OpenAI's chunk or
    # response ``service_tier``, Anthropic's ``usage.service_tier``, Gemini's
    # ``usageMetadata.serviceTier``), read from the files by hand
    "openai/chat_stream_usage_reasoning_gpt-5-nano.sse": "default",
    "openai/chat_json_gpt-3.5-turbo.json": "default",
    "openai/chat_json_cached_gpt-4o-mini.json": "default",
    "openai/chat_json_reasoning_gpt-5-nano.json": "default",
    "openai/responses_stream_gpt-4.1-nano.sse": "default",  # asked "auto", answered "default"
    "openai/responses_stream_reasoning_gpt-5.sse": "flex",
    "openai/responses_stream_websearch_cached_gpt-5.sse": "default",
    "anthropic/messages_stream_tools_claude-3-5-sonnet.sse": "standard",
    "anthropic/messages_stream_thinking_claude-sonnet-4-0.sse": "standard",
    "anthropic/messages_stream_server_tool_claude-sonnet-4-6.sse": "standard",
    "gemini/stream_thinking_gemini-2.5-flash.sse": "standard",
    "gemini/stream_code_execution_gemini-2.5-flash.sse": "standard",
    "gemini/generate_content_code_execution_gemini-2.5-flash.json": "standard",
    "gemini/generate_content_cached_gemini-2.5-flash.json": "standard",
}
EXTRAS = {name: Extras(service_tier=tier) for name, tier in _TIERS.items() if tier in _STANDARD} | {
    "openai/responses_stream_reasoning_gpt-5.sse": Extras(service_tier="flex"),
    # one completed web_search_call in the final response's output
    "openai/responses_stream_websearch_cached_gpt-5.sse": Extras(
        service_tier="default", tool_calls=(("web_search", 1),)
    ),
    # OpenRouter's usage.cost (USD), no tier
    "openai_compatible/openrouter_chat_stream_cached_reasoning_grok-4.sse": Extras(
        provider_cost=Decimal("0.00333825")
    ),
}
"""What each recording reports beyond its token counts (docs/reference.md §3)."""


def spendgate_usage(case: Case) -> Usage | None:
    """The usage spendgate must report: :func:`_tokens` with the recording's
    :data:`EXTRAS`."""
    tokens = _tokens(case)
    return None if tokens is None else tokens._replace(extras=EXTRAS.get(case.name))


def _tokens(case: Case) -> Usage | None:
    """The manifest's raw provider numbers, mapped by hand onto spendgate's fields.

    Checked against the recordings:
    - OpenAI/Azure/OpenRouter: the numbers are ``prompt_tokens``/``input_tokens``
      (cached included), ``completion_tokens``/``output_tokens`` (reasoning included),
      ``cached_tokens`` and ``reasoning_tokens``: already spendgate's terms.
    - Anthropic: ``input_tokens`` excludes cache reads (``cached_input_tokens``) and
      writes (``cache_creation_input_tokens``); spendgate's input is the sum. Newer
      responses carry ``cache_creation.ephemeral_1h_input_tokens`` (0 in every one).
    - Gemini: ``input_tokens`` is ``promptTokenCount``, ``output_tokens`` is
      ``candidatesTokenCount`` (thoughts excluded), ``reasoning_tokens`` is
      ``thoughtsTokenCount`` and ``total_tokens`` is ``totalTokenCount``. The manifest
      omits ``toolUsePromptTokenCount`` (764 and 720 in the code-execution files), but
      the total includes it, so it is the total less the other three.
    - Ollama: ``prompt_eval_count`` and ``eval_count``.
    """
    raw = case.entry["expected"]
    if all(v is None for v in raw.values()):
        return None
    api = case.entry["api"]
    inp, out = raw["input_tokens"], raw["output_tokens"]
    cached, reasoning = raw["cached_input_tokens"], raw["reasoning_tokens"]
    if api.startswith("anthropic."):
        write = raw["cache_creation_input_tokens"]
        return Usage(
            input_tokens=inp + (cached or 0) + (write or 0),
            output_tokens=out,
            cached_input_tokens=cached,
            cache_write_tokens=write,
            cache_write_1h_tokens=0 if b'"ephemeral_1h_input_tokens"' in case.data else None,
        )
    if api.startswith(("gemini.", "vertexai.")):
        tool_use = raw["total_tokens"] - inp - out - (reasoning or 0)
        return Usage(
            input_tokens=inp + tool_use,
            output_tokens=out + (reasoning or 0),
            cached_input_tokens=cached,
            reasoning_tokens=reasoning,
        )
    return Usage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, reasoning_tokens=reasoning
    )


PREFIX = {
    "openai": "/openai",
    "azure": "/azure",
    "anthropic": "/anthropic",
    "gemini": "/gemini",
    "vertexai": "/vertex",
    "ollama": "/ollama",
}


def route_prefix(case: Case) -> str:
    if case.name.startswith("openai_compatible/"):
        return "/openrouter"
    return PREFIX[case.entry["api"].split(".", 1)[0]]


async def through_proxy(
    case: Case, start_proxy: StartProxy, upstream: FakeUpstream
) -> tuple[dict[str, Any], bytes]:
    """``case`` replayed through a running proxy (its upstream sending the recorded bytes
    in 97-byte pieces) to a real HTTP client: the stored row and the bytes received."""
    base = upstream.base_url  # type: ignore[attr-defined]
    proxy = await start_proxy(
        routes=[
            RouteConfig(prefix="/azure", upstream=base, adapter="azure", provider="azure"),
            RouteConfig(prefix="/vertex", upstream=base, adapter="gemini", provider="vertex_ai"),
            RouteConfig(
                prefix="/openrouter", upstream=base, adapter="openai", provider="openrouter"
            ),
        ]
    )
    entry, data = case.entry, case.data
    upstream.queue(
        Reply(
            chunks=[data[i : i + 97] for i in range(0, len(data), 97)],
            content_type=entry["content_type"] or "application/octet-stream",
        )
    )
    url = urlsplit(entry["request_url"])
    path = f"/s/replay{route_prefix(case)}{url.path}" + (f"?{url.query}" if url.query else "")
    body = (FIXTURES / entry["request_file"]).read_bytes()
    async with proxy.http.request(
        entry["request_method"], proxy.url(path), data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:  # fmt: skip
        assert resp.status == 200
        received = await resp.read()
    assert upstream.seen[0].path == url.path
    (row,) = await proxy.messages("replay")
    return row, received
