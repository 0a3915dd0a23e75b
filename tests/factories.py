"""Builders for valid schema objects, shared by the tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from normalize.identity import email_identity, phone_identity
from normalize.schema import (
    Attachment,
    BlobRef,
    Flags,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    Thread,
)
from switchboard.ids import uuid7

SHA = "ab" * 32


def inbound_message(**overrides: Any) -> InboundMessage:  # noqa: ANN401 - field overrides
    """A fully populated email-like InboundMessage; override any field."""
    fields: dict[str, Any] = {
        "id": uuid7(),
        "channel": "email",
        "adapter": "smtp",
        "received_at": datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        "sent_at": datetime(2026, 11, 22, 9, 59, 30, tzinfo=UTC),
        "sender": email_identity("Alice@Example.COM", "Alice Example"),
        "identities": (phone_identity("+1 415 555 0100"),),
        "recipients": (
            Recipient(kind=IdentityKind.EMAIL, value="support@acme.test", role=RecipientRole.TO),
        ),
        "subject": "Invoice 1234 is wrong",
        "text": "Hello,\nmy invoice is wrong.\n",
        "text_new": "Hello,\nmy invoice is wrong.",
        "html": "<p>Hello,<br>my invoice is wrong.</p>",
        "attachments": (
            Attachment(
                filename="invoice.pdf",
                content_type="application/pdf",
                size=1234,
                sha256=SHA,
                blob=BlobRef(sha256=SHA, size=1234, content_type="application/pdf"),
            ),
        ),
        "thread": Thread(message_id="abc@mail.example.com", references=("x@y",)),
        "provider_message_id": None,
        "dedupe_key": "email-mid:abc@mail.example.com",
        "flags": Flags(),
        "raw": BlobRef(sha256="cd" * 32, size=4096, content_type="message/rfc822"),
        "metadata": {"helo": "mail.example.com", "size": 4096},
    }
    fields.update(overrides)
    return InboundMessage(**fields)
