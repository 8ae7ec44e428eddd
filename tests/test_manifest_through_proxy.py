"""Every recording in the manifest, replayed through the running proxy to a real client.

Adding a recording to ``MANIFEST.json`` adds a case here: the client must receive the
exact recorded bytes, and the stored row must carry the exact mapped numbers (or an
estimate, flagged, where the provider reported none).
"""

from __future__ import annotations

import pytest

from tests.conftest import StartProxy
from tests.helpers.recordings import CASES, Case, spendgate_usage, through_proxy
from tests.upstream import FakeUpstream


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_recording_through_proxy(
    case: Case, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    entry = case.entry
    data = case.data
    row, received = await through_proxy(case, start_proxy, upstream)
    expected = spendgate_usage(case)
    if expected is None:
        assert row["estimated"] is True, row
        if case.info.stream and entry["api"].startswith("openai.chat"):
            # the proxy asked for usage; the recording has none, so nothing was hidden
            assert received == data
        return
    assert received == data  # byte for byte
    counts = expected.counts()
    got = (row["inputTokens"], row["outputTokens"], row["cachedInputTokens"],
           row["cacheWriteTokens"], row["reasoningTokens"])  # fmt: skip
    want = (counts.input_tokens, counts.output_tokens, counts.cached_input_tokens,
            counts.cache_write_tokens, counts.reasoning_tokens)  # fmt: skip
    assert got == want
    assert row["estimated"] is False
    assert row["modelId"] == (entry["response_model"] or entry["model"])
