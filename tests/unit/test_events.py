from __future__ import annotations

from datetime import UTC, datetime

import pytest

from normalize.schema import InboundMessage
from switchboard.events import (
    TYPE_INBOUND,
    EnvelopeError,
    Event,
    new_event_id,
    read_data,
    read_meta,
)
from tests.factories import inbound_message


def _event() -> Event:
    message = inbound_message()
    return Event(
        type=TYPE_INBOUND,
        source="/switchboard/ingest/smtp",
        key=message.partition_key,
        data=message,
        subject=str(message.id),
        time=datetime(2026, 11, 22, 10, 0, 1, tzinfo=UTC),
    )


def test_binary_mode_headers() -> None:
    event = _event()
    headers = dict(event.headers())
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == event.id.encode()
    assert headers["ce_type"] == TYPE_INBOUND.encode()
    assert headers["ce_source"] == b"/switchboard/ingest/smtp"
    assert headers["ce_time"] == b"2026-11-22T10:00:01+00:00"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_subject"] == event.subject.encode()  # type: ignore[union-attr]


def test_headers_and_value_read_back() -> None:
    event = _event()
    meta = read_meta(event.headers())
    assert (meta.id, meta.type, meta.source, meta.subject) == (
        event.id,
        event.type,
        event.source,
        event.subject,
    )
    assert meta.time == event.time
    assert read_data(event.value(), InboundMessage) == event.data


def test_event_ids_are_unique_and_time_ordered_uuid7() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert all(i[14] == "7" for i in ids)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (None, "missing CloudEvents headers"),
        ([("ce_id", b"1")], "missing CloudEvents headers"),
        (
            [
                ("ce_specversion", b"0.3"),
                ("ce_id", b"1"),
                ("ce_type", b"t"),
                ("ce_source", b"s"),
                ("ce_time", b"2026-01-01T00:00:00+00:00"),
            ],
            "specversion",
        ),
        (
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"1"),
                ("ce_type", b"t"),
                ("ce_source", b"s"),
                ("ce_time", b"yesterday"),
            ],
            "RFC 3339",
        ),
        ([("ce_id", b"\xff\xfe")], "not UTF-8"),
    ],
)
def test_bad_headers_raise_envelope_errors(
    headers: list[tuple[str, bytes]] | None, reason: str
) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        read_meta(headers)


def test_bad_values_raise_envelope_errors() -> None:
    with pytest.raises(EnvelopeError, match="no value"):
        read_data(None, InboundMessage)
    with pytest.raises(EnvelopeError) as info:
        read_data(b'{"not": "a message"}', InboundMessage)
    assert info.value.reason == "schema"
