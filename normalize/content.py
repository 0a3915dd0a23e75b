"""Bytes that must be stored before an event referencing them is published."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from uuid import UUID

from pydantic import JsonValue

from normalize.schema import BlobRef, InboundMessage

#: The most characters of each body an event carries; the whole message stays in its
#: raw blob. Kafka takes a record of at most ``max_request_size`` (4 MiB by default):
#: a 5 MB plain-text mail made an event Kafka refused, which the spool then held in
#: front of every later message (2026-11-29). Four bytes a character at worst in
#: UTF-8 JSON: about 2.4 MB for all three.
BODY_LIMITS = {"text": 262_144, "text_new": 65_536, "html": 262_144}


def fit_for_event(message: InboundMessage) -> InboundMessage:
    """The message with each body clipped to :data:`BODY_LIMITS`, the original
    lengths in ``metadata["clipped"]``; the message itself when nothing is over."""
    over = {
        name: len(value)
        for name, limit in BODY_LIMITS.items()
        if (value := getattr(message, name)) is not None and len(value) > limit
    }
    if not over:
        return message
    clipped: dict[str, JsonValue] = dict(over)
    return message.model_copy(
        update={
            **{name: getattr(message, name)[: BODY_LIMITS[name]] for name in over},
            "metadata": {**message.metadata, "clipped": clipped},
        }
    )


@dataclass(frozen=True)
class Blob:
    """Bytes with their content address; :attr:`ref` goes into the event."""

    ref: BlobRef
    data: bytes = b""

    @classmethod
    def of(cls, data: bytes, content_type: str) -> Blob:
        """The blob of ``data``; a declared type longer than the schema's 255 is cut
        (RFC 6838 allows 127 + 1 + 127: anything longer is a sender's invention, and
        refusing it lost the whole message)."""
        digest = hashlib.sha256(data).hexdigest()
        ref = BlobRef(sha256=digest, size=len(data), content_type=content_type[:255])
        return cls(ref, data)


@dataclass(frozen=True)
class Normalized:
    """A message and every blob it references (raw first), to store before publishing."""

    message: InboundMessage
    blobs: tuple[Blob, ...]


@dataclass(frozen=True)
class Serialized:
    """A normalized message already serialized as its event's data, with the few
    fields the hand-off keys and logs on.

    Made where the message was normalized (the SMTP parse process), so the server
    process neither rebuilds the model from a pickle nor serializes it again: a
    pickled ``InboundMessage`` costs about 45 µs each way, its JSON 13 µs once.
    """

    id: UUID
    adapter: str
    channel: str
    partition_key: str
    dedupe_key: str
    raw: BlobRef | None
    value: bytes
    blobs: tuple[Blob, ...]
    #: Which blobs travel without their bytes: the caller holds them (see :meth:`eliding`).
    elided: tuple[int, ...] = ()

    def eliding(self, raw: bytes) -> Serialized:
        """This without the bytes of the blobs that are ``raw`` itself (the very
        object, not equal bytes): the SMTP parse process sends back no copy of the
        message the server process already holds (:meth:`restoring` puts it back)."""
        elided = tuple(i for i, blob in enumerate(self.blobs) if blob.data is raw)
        if not elided:
            return self
        blobs = tuple(Blob(blob.ref) if i in elided else blob for i, blob in enumerate(self.blobs))
        return replace(self, blobs=blobs, elided=elided)

    def restoring(self, raw: bytes) -> Serialized:
        """The elided blobs with their bytes again, from the ``raw`` that was parsed."""
        if not self.elided:
            return self
        blobs = list(self.blobs)
        for i in self.elided:
            if blobs[i].ref.size != len(raw) or blobs[i].data:
                raise ValueError("an elided blob is not the message that was parsed")
            blobs[i] = Blob(blobs[i].ref, raw)
        return replace(self, blobs=tuple(blobs), elided=())

    @classmethod
    def of(cls, normalized: Normalized) -> Serialized:
        message = fit_for_event(normalized.message)
        return cls(
            id=message.id,
            adapter=message.adapter,
            channel=str(message.channel),
            partition_key=message.partition_key,
            dedupe_key=message.dedupe_key,
            raw=message.raw,
            # The same bytes Event.value() would make from the model.
            value=message.model_dump_json().encode(),
            blobs=normalized.blobs,
        )
