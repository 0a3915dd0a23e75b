"""`switchboard events tail`: its argument parsing and filters, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from switchboard.tail import Filter, parse_since, topic_names, type_names
from switchboard.topics import ALL_TOPICS, CONTACTS, ROUTED

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_since_takes_durations_and_times() -> None:
    assert parse_since("10m", NOW) == datetime(2026, 11, 28, 11, 50, tzinfo=UTC)
    assert parse_since("2h", NOW) == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert parse_since("1d", NOW) == datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_since("2026-11-28T09:30", NOW) == datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday", NOW)


def test_topics_by_short_or_full_name() -> None:
    assert topic_names(None) == list(ALL_TOPICS)
    assert topic_names(["routed", CONTACTS]) == [ROUTED, CONTACTS]
    with pytest.raises(ValueError, match="unknown topic"):
        topic_names(["orders"])


def test_filters_by_type_and_contact() -> None:
    row = {
        "type": "io.switchboard.contact.merged.v1",
        "key": "c1",
        "contact_id": "c1",
        "data": '{"merged_contact_ids": ["c2"]}',
    }
    assert Filter(types=("contact.merged",)).matches(row)
    assert Filter(types=("io.switchboard.contact.merged.v1",)).matches(row)
    assert not Filter(types=("message.routed",)).matches(row)
    assert Filter(contact="c2").matches(row)
    assert not Filter(contact="c3").matches(row)


def test_event_types_by_short_or_full_name_and_unknown_ones_refused() -> None:
    assert type_names(None) == ()
    assert type_names(["contact.merged", "io.switchboard.message.routed.v1"]) == (
        "contact.merged",
        "io.switchboard.message.routed.v1",
    )
    # It matched nothing, silently (analyst review, 2026-12-01).
    with pytest.raises(ValueError, match=r"unknown event type 'merged'.*contact\.merged"):
        type_names(["merged"])
