"""Postmark inbound: ``POST /webhooks/postmark``, one JSON document per mail.

Postmark's ``MessageID`` is its own id for the delivery, not the mail's: the same
mail arriving by SMTP or IMAP carries its ``Message-ID`` header, found in
Postmark's ``Headers`` list. The dedupe key is that header (through the email
normalizer, as for every email channel); Postmark's id is kept as
``provider_message_id``. With "include raw email content" switched on
(``RawEmail``), the raw MIME is normalized as it is.

Postmark does not sign its requests: give the webhook URL HTTP Basic credentials
(``https://postmark:<password>@host/webhooks/postmark``, password in
``SWITCHBOARD_POSTMARK_PASSWORD``). Postmark retries any answer but 200 and stops
at 403, so: 401 for missing or wrong credentials (retried, so fixing a wrong
password loses nothing), 503 when not durable (retried), and a document it sent
that cannot be read is kept as a dead letter and answered 200.
"""

from __future__ import annotations

import base64
import binascii
from email.utils import formataddr
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ingest.jsonbody import load_json
from ingest.mailauth import postmark_verdict
from ingest.sdk import JSON, BasicAuthAdapter, BasicAuthSettings, InboundRequest
from normalize.content import Blob, Normalized
from normalize.email import EmailContext, normalize_email
from normalize.errors import NormalizeError
from normalize.parsed_email import ParsedAttachment, ParsedEmail, normalize_parsed_email
from normalize.schema import strip_controls, strip_controls_deep

PATH = "/webhooks/postmark"
# Headers Postmark gives as top-level fields; its Headers list holds the others.
_TOP_LEVEL = frozenset({"from", "to", "cc", "subject", "date", "reply-to"})


class PostmarkSettings(BasicAuthSettings):
    """[adapters.postmark]; the password from SWITCHBOARD_POSTMARK_PASSWORD."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_POSTMARK_", extra="forbid")

    username: str = Field(default="postmark", description="HTTP Basic user in the webhook URL.")
    max_body_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024,
        description="Largest request (35 MB mail, base64 attachments in JSON).",
    )


def _addresses(value: object) -> str | None:
    """``[{"Email": .., "Name": ..}]`` (or one such object) as a header value."""
    items = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    rendered = [
        formataddr((str(item.get("Name") or ""), str(item["Email"])))
        for item in items
        if isinstance(item, dict) and item.get("Email")
    ]
    return ", ".join(rendered) or None


def _attachment(item: object) -> ParsedAttachment:
    if not isinstance(item, dict):
        raise NormalizeError("malformed", "an attachment is not an object")
    try:
        data = base64.b64decode(str(item.get("Content") or ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NormalizeError("malformed", f"attachment {item.get('Name')!r} is not base64") from exc
    return ParsedAttachment(
        filename=str(item["Name"]) if item.get("Name") else None,
        content_type=str(item.get("ContentType") or "application/octet-stream"),
        data=data,
        content_id=str(item["ContentID"]) if item.get("ContentID") else None,
    )


def _header(document: dict[str, Any], name: str) -> str | None:
    """The first (Postmark's own, topmost) value of a header in ``Headers``."""
    headers = document.get("Headers")
    for item in headers if isinstance(headers, list) else []:
        if isinstance(item, dict) and str(item.get("Name", "")).lower() == name.lower():
            value = item.get("Value")
            return str(value) if value is not None else None
    return None


def parsed_email(document: dict[str, Any]) -> ParsedEmail:
    """A Postmark inbound document as the parts of one email."""
    top = [
        ("From", _addresses(document.get("FromFull")) or document.get("From")),
        ("To", _addresses(document.get("ToFull")) or document.get("To")),
        ("Cc", _addresses(document.get("CcFull")) or document.get("Cc")),
        ("Reply-To", document.get("ReplyTo")),
        ("Subject", document.get("Subject")),
        ("Date", document.get("Date")),
    ]
    headers = [(name, str(value)) for name, value in top if value]
    listed = document.get("Headers") or []
    if not isinstance(listed, list):
        raise NormalizeError("malformed", "Headers is not a list")
    for item in listed:
        if isinstance(item, dict) and item.get("Name") and item.get("Value") is not None:
            name = str(item["Name"])
            if name.lower() not in _TOP_LEVEL:
                headers.append((name, str(item["Value"])))
    attachments = document.get("Attachments") or []
    if not isinstance(attachments, list):
        raise NormalizeError("malformed", "Attachments is not a list")
    postmark_id = document.get("MessageID")
    return ParsedEmail(
        headers=headers,
        text=document.get("TextBody") or None,
        html=document.get("HtmlBody") or None,
        attachments=[_attachment(item) for item in attachments],
        provider_message_id=str(postmark_id) if postmark_id else None,
        metadata={
            "postmark": {
                "message_id": str(postmark_id) if postmark_id else None,
                "original_recipient": document.get("OriginalRecipient"),
                "mailbox_hash": document.get("MailboxHash"),
                "message_stream": document.get("MessageStream"),
            }
        },
    )


class PostmarkAdapter(BasicAuthAdapter[PostmarkSettings]):
    """Postmark inbound webhook, behind HTTP Basic."""

    name = "postmark"
    summary = "Postmark inbound at POST /webhooks/postmark (JSON), deduplicated by Message-ID"
    settings_class = PostmarkSettings
    path = PATH
    media_type = JSON
    provider = "Postmark"
    # 401, never 403, for wrong credentials: 403 would stop Postmark's retries.
    on_unauthorized = "Postmark retries"

    offload = True  # mail, parsed in a parse process

    def parse(self, request: InboundRequest) -> Normalized:
        document = load_json(request.body)
        if not isinstance(document, dict):
            raise NormalizeError("malformed", "the body is not a JSON object")
        recipient = document.get("OriginalRecipient")
        ctx = EmailContext(
            adapter=self.name,
            message_id=request.message_id,
            received_at=request.received_at,
            rcpt_tos=(str(recipient),) if recipient else (),
            verdict=postmark_verdict(_header(document, "Received-SPF")),
        )
        parsed = parsed_email(document)
        raw_email = document.get("RawEmail")
        if isinstance(raw_email, str) and raw_email:
            normalized = normalize_email(raw_email.encode("utf-8", "surrogateescape"), ctx)
            provider_id = parsed.provider_message_id
            message = normalized.message.revised(
                provider_message_id=strip_controls(provider_id) or None if provider_id else None,
                metadata=strip_controls_deep({**normalized.message.metadata, **parsed.metadata}),
            )
            return Normalized(message=message, blobs=normalized.blobs)
        return normalize_parsed_email(parsed, Blob.of(request.body, JSON), ctx)
