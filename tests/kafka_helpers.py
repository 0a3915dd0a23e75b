"""Helpers for tests that consume from the real broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from switchboard.settings import MIN_POLL_TIMEOUT_MS


def consume_until(
    consumer: Any,  # noqa: ANN401 - kafka-python is untyped
    done: Callable[[list[Any]], bool],
    timeout_s: float = 20.0,
) -> list[Any]:
    """Poll (with the join-safe timeout) until ``done(records)`` or the deadline."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS).values():
            records.extend(batch)
        if done(records):
            return records
    return records
