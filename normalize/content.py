"""Bytes that must be stored before an event referencing them is published."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from normalize.schema import BlobRef, InboundMessage


@dataclass(frozen=True)
class Blob:
    """Bytes with their content address; :attr:`ref` goes into the event."""

    ref: BlobRef
    data: bytes = b""

    @classmethod
    def of(cls, data: bytes, content_type: str) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        return cls(BlobRef(sha256=digest, size=len(data), content_type=content_type), data)


@dataclass(frozen=True)
class Normalized:
    """A message and every blob it references (raw first), to store before publishing."""

    message: InboundMessage
    blobs: tuple[Blob, ...]
