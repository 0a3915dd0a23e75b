"""The evidence budget of refused requests: a sliding minute per route, one log line
per interval for what goes over it."""

from __future__ import annotations

import logging

import pytest

from ingest.evidence import EvidenceBudget


def test_at_most_n_per_sliding_minute_per_route_and_one_log_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    budget = EvidenceBudget(per_minute=3, max_bytes=4, log_every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="ingest.evidence"):
        assert [budget.admit("twilio") for _ in range(5)] == [True, True, True, False, False]
        assert budget.admit("webhook:form")  # another route has its own budget
        now[0] = 59.9
        assert not budget.admit("twilio")  # the first three are still within the minute
        now[0] = 60.0  # the first three are a minute old: three more may be kept
        assert [budget.admit("twilio") for _ in range(4)] == [True, True, True, False]
        now[0] = 100.0
        assert not budget.admit("twilio")
        now[0] = 120.0
        assert [budget.admit("twilio") for _ in range(4)] == [True, True, True, False]
    over = [r for r in caplog.records if "over the evidence budget" in r.getMessage()]
    # Logged at 0 s (1 dropped), 60 s (3 since: 0, 59.9, 60) and 120 s (2: 100, 120).
    assert [r.__dict__["dropped"] for r in over] == [1, 3, 2]
    assert budget.clip(b"0123456789") == b"0123"
