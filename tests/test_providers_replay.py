"""Replay every recorded provider response through its adapter, split every which way.

The manifest's ``expected`` numbers are the provider's *raw* usage fields; each
adapter must map them onto spendgate's terms (docs/reference.md §3). ``spendgate_usage`` in
tests/helpers/recordings.py does that mapping independently, from what the recordings
were checked to contain.
"""

from __future__ import annotations

import gzip
import itertools
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.forwarding import (
    INFLATE_PIECE,
    MAX_DECODED_BYTES,
    STEP_BYTES,
    Inflater,
    _codec,
    inflater,
)
from spendgate.providers import _common, _sse_decoder, get_adapter, openai
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


# --- the bounds under fuzzing (issue #16) ----------------------------------------------------

STREAMED = [c for c in CASES if c.name.endswith((".sse", ".ndjson"))]
SMALL_CAP = 8192
"""The event/line cap while fuzzing: above the largest event of any recording (7,151
bytes), small enough that a "giant" line is a few KiB."""


def _boundaries(case: Case) -> list[int]:
    """Offsets between events (SSE) or lines (NDJSON) of a recording."""
    sep = b"\n" if case.name.endswith(".ndjson") else b"\n\n"
    data, out, at = case.data.replace(b"\r\n", b"\n"), [0], 0
    while (at := data.find(sep, at)) >= 0:
        at += len(sep)
        out.append(at)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_giant_lines_between_events_change_nothing_else(data: st.DataObject) -> None:
    """A line or event past the cap, anywhere between events and however the body is
    split, is skipped and noted; every other event still counts as it did."""
    case = data.draw(st.sampled_from([c for c in STREAMED if b"\r" not in c.data]), label="fixture")
    whole = case.replay([case.data])
    ndjson = case.name.endswith(".ndjson")
    at = data.draw(st.sampled_from(_boundaries(case)), label="at")
    size = data.draw(st.integers(SMALL_CAP + 1, 4 * SMALL_CAP), label="size")
    giant = b"x" * size + b"\n" if ndjson else b"data: " + b"x" * size + b"\n\n"
    body = case.data[:at] + giant + case.data[at:]
    step = data.draw(st.integers(16, 2000), label="piece size")
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    with (
        mock.patch.object(_sse_decoder, "MAX_EVENT_BYTES", SMALL_CAP),
        mock.patch.object(_common, "MAX_EVENT_BYTES", SMALL_CAP),
        mock.patch.object(openai, "MAX_HELD", SMALL_CAP // 4),  # held below the cap, as
        mock.patch.object(openai, "MAX_TAIL", SMALL_CAP // 4),  # 64 KiB is below 8 MiB
    ):
        parser = case.replay(pieces)
    assert (parser.usage, parser.model, parser.output_chars) == (
        whole.usage,
        whole.model,
        whole.output_chars,
    )
    if size > SMALL_CAP + step:  # held past the cap (held bytes may reach cap + a piece)
        assert any(n.startswith("oversized") for n in parser.notes), parser.notes


def _compress(encoding: str, data: bytes) -> bytes:
    if encoding == "br":
        return bytes(pytest.importorskip("brotli").compress(data, quality=4))
    if encoding == "zstd":
        return bytes(pytest.importorskip("zstandard").ZstdCompressor().compress(data))
    return gzip.compress(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), encoding=st.sampled_from(["gzip", "br", "zstd"]))
def test_property_a_compressed_body_reads_as_the_plain_one_within_the_cap(
    data: st.DataObject, encoding: str
) -> None:
    """Through the bounded decompressor, in any pieces, a recording reads as it does
    uncompressed; a bomb stops at the cap, inflating about one piece at a time."""
    case = data.draw(st.sampled_from(CASES), label="fixture")
    packed = _compress(encoding, case.data)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(packed)), max_size=6), label="cuts"))
    bounds = [0, *cuts, len(packed)]
    pieces = [packed[a:b] for a, b in itertools.pairwise(bounds)]
    reference = case.replay([case.data])
    parser = case.parser()
    inflate = inflater(parser.feed, encoding)
    assert inflate is not None
    for piece in pieces:
        inflate(piece)
    parser.close()
    parser.settle()
    assert inflate.note is None
    assert (parser.usage, parser.model, parser.output_chars) == (
        reference.usage,
        reference.model,
        reference.output_chars,
    )
    # A bomb made of the recording and a run of zeros: the parser gets at most `limit`.
    limit = data.draw(st.integers(1, 4 * len(case.data)), label="limit")
    bomb = _compress(encoding, case.data * 8 + b"\0" * (1 << 20))
    got: list[int] = []
    codec = _codec(encoding)
    assert codec is not None
    capped = Inflater(lambda b: got.append(len(b)), codec, limit)
    for i in range(0, len(bomb), 4096):
        capped(bomb[i : i + 4096])
    assert sum(got) <= limit and max(got, default=0) <= 2 * INFLATE_PIECE + (2 << 20)
    assert capped.note is not None and capped.note.startswith("compressed body over")


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_one_piece_of_a_bomb_inflates_at_most_a_step_and_the_rest_waits(encoding: str) -> None:
    """A bomb's first 64 KiB may hold the whole cap: each piece (and each ``step``)
    inflates at most about ``STEP_BYTES``, so other requests get their turn between."""
    bomb = _compress(encoding, b"\0" * (80 << 20))
    got: list[int] = []
    codec = _codec(encoding)
    assert codec is not None
    inflate = Inflater(lambda b: got.append(len(b)), codec, MAX_DECODED_BYTES)
    inflate(bomb[:65536])
    steps = [sum(got)]
    while inflate.pending:
        inflate.step()
        steps.append(sum(got) - sum(steps))
    assert max(steps) <= STEP_BYTES + 2 * INFLATE_PIECE + (2 << 20)
    assert len(steps) >= MAX_DECODED_BYTES // (2 * STEP_BYTES)
    assert sum(got) <= MAX_DECODED_BYTES and inflate.note is not None
