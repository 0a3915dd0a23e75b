"""The CloudEvents 1.0 envelope in Kafka binary mode.

Binary mode puts the event attributes in record headers (``ce_specversion``,
``ce_id``, ``ce_type``, ``ce_source``, ``ce_time``, optional ``ce_subject``,
``content-type``) and the data, the model's JSON, in the value. Written here
rather than with the ``cloudevents`` SDK: the binding is a fixed mapping of a
handful of headers, and our data are pydantic models that serialize themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from switchboard.ids import uuid7_text

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"

# Event types: reverse-DNS style, versioned with the schema.
TYPE_INBOUND = "io.switchboard.message.inbound.v1"
TYPE_DEADLETTER = "io.switchboard.deadletter.v1"
TYPE_ROUTED = "io.switchboard.message.routed.v1"
TYPE_DUPLICATE = "io.switchboard.message.duplicate.v1"
TYPE_CONVERSATION_STATUS = "io.switchboard.conversation.status.v1"


def contact_event_type(kind: str) -> str:
    """``contact.merged`` -> ``io.switchboard.contact.merged.v1``."""
    return f"io.switchboard.{kind}.v1"


_SPECVERSION_HEADER = ("ce_specversion", SPECVERSION.encode())
_CONTENT_TYPE_HEADER = ("content-type", CONTENT_TYPE.encode())

ModelT = TypeVar("ModelT", bound=BaseModel)

Headers = list[tuple[str, bytes]]


class EnvelopeError(ValueError):
    """A record is not a valid Switchboard CloudEvent; ``reason`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def new_event_id() -> str:
    """A fresh UUIDv7: unique and ordered by creation time."""
    return uuid7_text()


@dataclass(frozen=True)
class Event:
    """One CloudEvent ready to publish. ``key`` becomes the Kafka record key.

    ``data`` is a model, or its JSON already serialized (an event re-emitted
    from a store, byte for byte as it was first published).
    """

    type: str
    source: str
    key: str
    data: BaseModel | bytes
    id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = None

    def headers(self) -> Headers:
        headers: Headers = [
            _SPECVERSION_HEADER,
            ("ce_id", self.id.encode()),
            ("ce_type", self.type.encode()),
            ("ce_source", self.source.encode()),
            ("ce_time", self.time.astimezone(UTC).isoformat().encode()),
            _CONTENT_TYPE_HEADER,
        ]
        if self.subject is not None:
            headers.append(("ce_subject", self.subject.encode()))
        return headers

    def value(self) -> bytes:
        """The data as JSON, serialized once: the router records an event in its
        outbox and then publishes it, and a routed event carries the whole message."""
        if isinstance(self.data, bytes):
            return self.data
        cached: bytes | None = self.__dict__.get("_value")
        if cached is None:
            # model_dump_json() without its text: the same bytes, not decoded to be
            # encoded again, nor its fifteen keywords passed (1 µs, 2026-12-02).
            cached = self.data.__pydantic_serializer__.to_json(self.data)
            self.__dict__["_value"] = cached  # frozen dataclass: not a field, not compared
        return cached


@dataclass(frozen=True)
class EventMeta:
    """The CloudEvents attributes read back from a record's headers."""

    id: str
    type: str
    source: str
    time: datetime
    subject: str | None


def read_meta(headers: list[tuple[str, bytes]] | None) -> EventMeta:
    """Parse the CloudEvents headers of a consumed record."""
    found: dict[str, str] = {}
    for name, raw in headers or []:
        try:
            found[name] = raw.decode()
        except (UnicodeDecodeError, AttributeError) as exc:
            raise EnvelopeError("headers", f"header {name!r} is not UTF-8") from exc
    missing = [
        h for h in ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time") if h not in found
    ]
    if missing:
        raise EnvelopeError("headers", f"missing CloudEvents headers: {', '.join(missing)}")
    if found["ce_specversion"] != SPECVERSION:
        raise EnvelopeError("headers", f"unsupported specversion {found['ce_specversion']!r}")
    if found.get("content-type", CONTENT_TYPE) != CONTENT_TYPE:
        raise EnvelopeError("headers", f"unsupported content-type {found['content-type']!r}")
    try:
        time = datetime.fromisoformat(found["ce_time"])
    except ValueError as exc:
        raise EnvelopeError("headers", f"ce_time {found['ce_time']!r} is not RFC 3339") from exc
    return EventMeta(
        id=found["ce_id"],
        type=found["ce_type"],
        source=found["ce_source"],
        time=time,
        subject=found.get("ce_subject"),
    )


def read_data(value: bytes | None, model: type[ModelT]) -> ModelT:
    """Validate a record value against the expected model."""
    if value is None:
        raise EnvelopeError("empty", "record has no value")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        raise EnvelopeError("schema", f"not a valid {model.__name__}: {exc}") from exc
