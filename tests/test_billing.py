"""The billing rules (spendgate.billing): provider numbers or estimates, and when."""

from __future__ import annotations

import pytest

from spendgate.billing import NOTHING, billed_counts, estimated_counts
from spendgate.providers._api import RequestInfo
from spendgate.usage import TokenCounts, Usage

CHAT = RequestInfo(operation="chat", model="gpt-4o", stream=True, input_chars=400)
FULL = Usage(input_tokens=120, output_tokens=30, cached_input_tokens=20, reasoning_tokens=5)


def test_a_complete_response_is_billed_what_the_provider_reported() -> None:
    assert billed_counts(CHAT, 200, True, FULL) == FULL.counts()


@pytest.mark.parametrize("info", [RequestInfo(operation="other"), RequestInfo(operation="")])
def test_unmetered_operations_bill_nothing_whatever_was_reported(info: RequestInfo) -> None:
    assert not info.metered
    assert billed_counts(info, 200, True, FULL) == NOTHING


def test_no_upstream_answer_bills_nothing() -> None:
    assert billed_counts(CHAT, 0, False, None) == NOTHING


@pytest.mark.parametrize("complete", [True, False])
def test_an_error_status_bills_only_what_was_reported_and_never_estimates(complete: bool) -> None:
    assert billed_counts(CHAT, 429, complete, None) == NOTHING
    part = Usage(input_tokens=50)
    assert billed_counts(CHAT, 500, complete, part) == TokenCounts(input_tokens=50)


def test_a_response_cut_short_is_estimated_even_with_a_report() -> None:
    assert billed_counts(CHAT, 200, False, FULL) is None


@pytest.mark.parametrize("partial", [Usage(input_tokens=120), Usage(output_tokens=30), None])
def test_a_report_missing_input_or_output_is_estimated(partial: Usage | None) -> None:
    assert billed_counts(CHAT, 200, True, partial) is None


def test_estimates_come_from_the_request_size_and_the_streamed_characters() -> None:
    # 400 prompt characters ≈ 100 tokens; 41 output characters ≈ 11 tokens (rounded up)
    assert estimated_counts(CHAT, None, 41) == TokenCounts(input_tokens=100, output_tokens=11)


def test_an_estimate_keeps_what_the_provider_did_report() -> None:
    reported = Usage(input_tokens=130, output_tokens=2, cached_input_tokens=64)
    counts = estimated_counts(CHAT, reported, 400)
    assert counts.input_tokens == 130  # the provider's number, not the 100 estimated
    assert counts.output_tokens == 100  # the larger of reported (2) and streamed (100)
    assert counts.cached_input_tokens == 64


def test_an_estimate_never_goes_below_a_reported_running_total() -> None:
    counts = estimated_counts(CHAT, Usage(input_tokens=10, output_tokens=500), 40)
    assert counts.output_tokens == 500
