"""`switchboard events tail` against real brokers: it follows the embedded broker
of a new `switchboard run` when the data dir names another one."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from normalize.identity import email_identity
from normalize.schema import InboundMessage
from switchboard.ids import uuid7
from switchboard.tail import tail
from switchboard.topics import ALL_TOPICS
from tests.router_helpers import fresh_kafka, publish

pytestmark = pytest.mark.integration


def _message(text: str) -> InboundMessage:
    return InboundMessage(
        id=uuid7(),
        channel="email",
        adapter="test",
        received_at=datetime.now(UTC),
        sender=email_identity("erin@example.org"),
        text=text,
        dedupe_key=f"test:{text}",
    )


def _until(check: Any, timeout_s: float = 30) -> None:  # noqa: ANN401 - a callable
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_the_tail_moves_to_the_broker_of_a_new_run() -> None:
    """It followed the stopped broker's port for good, logging connection errors,
    and never showed an event of the next `switchboard run` (analyst review)."""
    rows: list[dict[str, Any]] = []
    notices: list[str] = []
    named: list[str | None] = [None]
    stop = threading.Event()
    with fresh_kafka(partitions=1) as first:
        named[0] = first.bootstrap
        publish(first, [_message("before the restart")])

        def run() -> None:
            for row in tail(
                first,
                ALL_TOPICS,
                start="beginning",
                stop=stop.is_set,
                follow=lambda: named[0],
                notice=notices.append,
            ):
                rows.append(row)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        _until(lambda: len(rows) == 1)
    try:
        with fresh_kafka(partitions=1) as second:
            assert second.bootstrap != first.bootstrap
            publish(second, [_message("after the restart")])
            named[0] = second.bootstrap  # what the new run writes in the data dir
            _until(lambda: len(rows) == 2)
    finally:
        stop.set()
        thread.join(20)
    texts = [row["data"] for row in rows]
    assert "before the restart" in texts[0]
    assert "after the restart" in texts[1]
    assert any(str(second.bootstrap) in notice for notice in notices), notices
