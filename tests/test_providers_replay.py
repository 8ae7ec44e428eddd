"""Replay every recorded provider response through its adapter, split every which way.

The manifest's ``expected`` numbers are the provider's *raw* usage fields; each
adapter must map them onto spendgate's terms (SPEC 2). ``spendgate_usage`` below
does that mapping independently, from what the recordings were checked to contain.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.providers import get_adapter
from spendgate.providers._api import Adapter, RequestInfo, ResponseParser
from spendgate.usage import Usage
from tests.paths import FIXTURES, manifest

ENTRIES = [e for e in manifest() if not e["file"].startswith("bedrock/")]  # no adapter yet
FULL_SPLIT_LIMIT = 8_000
"""Files up to this size are split at every offset. A split costs a whole parse, so
the cost grows with the square of the size (a 16 KB stream alone would take ~8 s);
larger files are split at every offset of their first 512 bytes and last 1 KB (the
first event and the usage tail) plus ~500 offsets a prime stride apart, which land at
every position within lines and events across the file."""

NO_VISIBLE_OUTPUT = {"openai/chat_stream_usage_reasoning_gpt-5-nano.sse"}
"""All 100 allowed tokens went to hidden reasoning (finish_reason=length): no deltas."""


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


def spendgate_usage(case: Case) -> Usage | None:
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


def check(case: Case, parser: ResponseParser, how: str) -> None:
    assert parser.usage == spendgate_usage(case), f"{case.name} ({how})"
    assert parser.model == case.entry["response_model"], f"{case.name} ({how})"
    total = case.entry["expected"]["total_tokens"]
    if total is not None and parser.usage is not None:
        assert parser.usage.total_tokens == total, case.name
    if case.name not in NO_VISIBLE_OUTPUT:
        assert parser.output_chars > 0, f"{case.name} ({how})"


def split_offsets(data: bytes) -> list[int]:
    n = len(data)
    if n <= FULL_SPLIT_LIMIT:
        return list(range(n + 1))
    stride = next(p for p in range(n // 500, n) if all(p % d for d in range(2, int(p**0.5) + 1)))
    return sorted({*range(512), *range(n - 1024, n + 1), *range(0, n, stride)})


ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_whole(case: Case) -> None:
    check(case, case.replay([case.data]), "whole")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_feed_whole_is_feed_then_close(case: Case) -> None:
    # The proxy's non-streamed path hands over the whole body at once (JSON documents
    # skip the framer); every recording, streamed ones too, must read the same.
    reference = case.replay([case.data])
    parser = case.parser()
    parser.feed_whole(case.data)
    parser.settle()
    got = (parser.usage, parser.model, parser.output_chars)
    assert got == (reference.usage, reference.model, reference.output_chars), case.name
    check(case, parser, "feed_whole")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_every_split(case: Case) -> None:
    reference = case.replay([case.data])
    expected = (reference.usage, reference.model, reference.output_chars)
    data = case.data
    for k in split_offsets(data):
        parser = case.replay([data[:k], data[k:]])
        got = (parser.usage, parser.model, parser.output_chars)
        assert got == expected, f"{case.name} split at {k}"
    check(case, reference, "reference")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_byte_at_a_time(case: Case) -> None:
    data = case.data
    check(case, case.replay([data[i : i + 1] for i in range(len(data))]), "1-byte writes")


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini", "ollama"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_splits_match_whole(family: str, data: st.DataObject) -> None:
    """Property: any chunking of a recording yields the same result as the whole."""
    cases = [c for c in CASES if c.adapter is get_adapter(family)]
    case = data.draw(st.sampled_from(cases), label="fixture")
    cuts = data.draw(
        st.lists(st.integers(0, len(case.data)), max_size=12).map(sorted), label="cuts"
    )
    bounds = [0, *cuts, len(case.data)]
    pieces = [case.data[a:b] for a, b in itertools.pairwise(bounds)]
    whole = case.replay([case.data])
    parser = case.replay(pieces)
    assert (parser.usage, parser.model, parser.output_chars) == (
        whole.usage,
        whole.model,
        whole.output_chars,
    )
