"""One archive row per Kafka record: pure code, no I/O.

The columns are the contract with analysts (docs/analytics.md lists them): the
CloudEvents attributes, the Kafka coordinates, typed columns for the fields most
queries need, and the event's full JSON. A record that is not a valid event (not
UTF-8, not JSON, no CloudEvents headers, an unknown type) still gets its row: the
coordinates, the raw value, and ``archive_error`` saying what was wrong. The
archive never refuses a record; deciding what is valid is the consumers' job.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

# orjson parses an event's JSON about three times faster than the standard library,
# and parsing was the archive's largest cost per record (bench/archive.py). The
# standard library stays the judge of what is JSON: it reads what orjson refuses
# (integers past 64 bits, NaN), so a row's archive_error never depends on the parser.
import orjson
import pyarrow as pa

from normalize.schema import ContactEventKind
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_INBOUND,
    TYPE_ROUTED,
    EnvelopeError,
    contact_event_type,
    read_meta,
)

_TS = pa.timestamp("us", tz="UTC")
_CONTACT_TYPES = frozenset(contact_event_type(kind) for kind in ContactEventKind)

#: The Parquet schema of every archive file. New columns are only ever appended
#: (readers that union files by name see nulls in older files).
SCHEMA = pa.schema(
    [
        # CloudEvents attributes (from the record headers).
        pa.field("id", pa.string()),
        pa.field("type", pa.string()),
        pa.field("source", pa.string()),
        pa.field("time", _TS),
        pa.field("subject", pa.string()),
        # Kafka coordinates.
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("kafka_timestamp", _TS),
        # Typed columns analysts use most (null where the event type has no such field).
        pa.field("message_id", pa.string()),
        pa.field("channel", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("sender_kind", pa.string()),
        pa.field("received_at", _TS),
        pa.field("contact_id", pa.string()),
        pa.field("conversation_id", pa.string()),
        pa.field("owner", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("new_contact", pa.bool_()),
        pa.field("new_conversation", pa.bool_()),
        pa.field("routed_at", _TS),
        pa.field("kind", pa.string()),
        pa.field("other_contact_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("by", pa.string()),
        pa.field("occurred_at", _TS),
        pa.field("stage", pa.string()),
        pa.field("auto_reply", pa.bool_()),
        pa.field("bounce", pa.bool_()),
        pa.field("display_name", pa.string()),
        # The event as published, and what could not be read.
        pa.field("data", pa.string()),
        pa.field("raw", pa.binary()),
        pa.field("archive_error", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


def _ts(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _message_fields(message: dict[str, Any]) -> dict[str, Any]:
    sender = message.get("sender")
    flags = message.get("flags")
    return {
        "message_id": _text(message.get("id")),
        "channel": _text(message.get("channel")),
        "adapter": _text(message.get("adapter")),
        "sender_kind": _text(sender.get("kind")) if isinstance(sender, dict) else None,
        "received_at": _ts(message.get("received_at")),
        "auto_reply": _flag(flags.get("auto_reply")) if isinstance(flags, dict) else None,
        "bounce": _flag(flags.get("bounce")) if isinstance(flags, dict) else None,
    }


def _typed(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The typed columns of one event, read leniently from its JSON."""
    if event_type == TYPE_INBOUND:
        return _message_fields(data)
    common = {
        "contact_id": _text(data.get("contact_id")),
        "conversation_id": _text(data.get("conversation_id")),
        "owner": _text(data.get("owner")),
        "reason": _text(data.get("reason")),
        "occurred_at": _ts(data.get("occurred_at")),
    }
    if event_type == TYPE_ROUTED:
        message = data.get("message")
        return {
            **(_message_fields(message) if isinstance(message, dict) else {}),
            **common,
            "new_contact": _flag(data.get("new_contact")),
            "new_conversation": _flag(data.get("new_conversation")),
            "routed_at": _ts(data.get("routed_at")),
        }
    if event_type == TYPE_DUPLICATE:
        return {
            **common,
            "message_id": _text(data.get("message_id")),
            "channel": _text(data.get("channel")),
            "adapter": _text(data.get("adapter")),
            "received_at": _ts(data.get("received_at")),
        }
    if event_type == TYPE_CONVERSATION_STATUS:
        return {**common, "status": _text(data.get("status")), "by": _text(data.get("changed_by"))}
    if event_type == TYPE_DEADLETTER:
        return {
            **common,
            "stage": _text(data.get("stage")),
            "adapter": _text(data.get("adapter")),
        }
    if event_type in _CONTACT_TYPES:
        return {
            **common,
            "kind": _text(data.get("kind")),
            "message_id": _text(data.get("message_id")),
            "other_contact_id": _text(data.get("other_contact_id")),
            "by": _text(data.get("by")),
            "display_name": _text(data.get("display_name")),
        }
    raise LookupError(f"unknown event type {event_type!r}")


def _parse(value: bytes, text: str) -> Any:  # noqa: ANN401 - any JSON value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _kafka_time(record: Any) -> datetime | None:  # noqa: ANN401 - a ConsumerRecord
    stamp = getattr(record, "timestamp", None)
    if not isinstance(stamp, int) or stamp < 0:
        return None
    return datetime.fromtimestamp(stamp / 1000, UTC)


def row_day(row: dict[str, Any]) -> str:
    """The ``date=`` partition of a row: its record's Kafka timestamp's UTC day.

    The broker's append time, not the event's own time: it is what a replay reads
    again, so a re-written range lands in the same directory.
    """
    stamp = row.get("kafka_timestamp")
    return stamp.date().isoformat() if isinstance(stamp, datetime) else "1970-01-01"


def to_row(record: Any) -> dict[str, Any]:  # noqa: ANN401 - a ConsumerRecord
    """The archive row of one record; never raises for what the record holds."""
    key = record.key
    row: dict[str, Any] = {
        "topic": str(record.topic),
        "partition": int(record.partition),
        "offset": int(record.offset),
        "key": key.decode(errors="replace") if isinstance(key, bytes) else None,
        "kafka_timestamp": _kafka_time(record),
    }
    errors: list[str] = []
    try:
        meta = read_meta(record.headers)
        row.update(
            id=meta.id, type=meta.type, source=meta.source, time=meta.time, subject=meta.subject
        )
        if meta.time.tzinfo is None:
            row["time"] = None
    except EnvelopeError as exc:
        meta = None
        errors.append(f"envelope-{exc.reason}: {exc.detail}")
    value = record.value
    text: str | None = None
    if not isinstance(value, bytes):
        errors.append("empty: the record has no value")
    else:
        try:
            text = value.decode()
        except UnicodeDecodeError:
            row["raw"] = value
            errors.append("encoding: the value is not UTF-8")
    if text is not None:
        row["data"] = text
        try:
            data = _parse(value, text)
        except ValueError:
            data = None
            errors.append("json: the value is not JSON")
        if data is not None and not isinstance(data, dict):
            errors.append("json: the value is not a JSON object")
        elif isinstance(data, dict) and meta is not None:
            try:
                row.update(_typed(meta.type, data))
            except LookupError as exc:
                errors.append(f"type: {exc.args[0]}")
    if errors:
        row["archive_error"] = "; ".join(errors)[:1000]
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts holding any subset of :data:`COLUMNS`) as one Arrow table."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)
