"""Replay every recorded provider response through its adapter, split every which way.

The manifest's ``expected`` numbers are the provider's *raw* usage fields; each
adapter must map them onto spendgate's terms (docs/reference.md §3). ``spendgate_usage`` in
tests/helpers/recordings.py does that mapping independently, from what the recordings
were checked to contain.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.providers import get_adapter
from spendgate.providers._api import ResponseParser
from tests.helpers.recordings import CASES, Case, spendgate_usage

FULL_SPLIT_LIMIT = 8_000
"""Files up to this size are split at every offset. A split costs a whole parse, so
the cost grows with the square of the size (a 16 KB stream alone would take ~8 s);
larger files are split at every offset of their first 512 bytes and last 1 KB (the
first event and the usage tail) plus ~500 offsets a prime stride apart, which land at
every position within lines and events across the file."""

NO_VISIBLE_OUTPUT = {"openai/chat_stream_usage_reasoning_gpt-5-nano.sse"}
"""All 100 allowed tokens went to hidden reasoning (finish_reason=length): no deltas."""


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
