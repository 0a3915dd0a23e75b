"""Email that a provider parsed for us (Mailgun, SendGrid, Postmark), normalized by
the same email normalizer as SMTP and IMAP mail.

Providers that do not forward the raw MIME give its parts: the header list, the
text and HTML bodies, the attachments. They are put back into one MIME message
with the standard library's :class:`email.message.EmailMessage`, which then goes
through :func:`normalize.email.normalize_email`: the same sender rules, the same
Message-ID dedupe key (so a mail seen by SMTP and through a provider is one
message), the same HTML sanitizing and attachment handling. The stored raw
payload is what the provider sent, not the rebuilt MIME.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email import policy
from email.errors import HeaderParseError
from email.message import EmailMessage

from pydantic import JsonValue

from normalize.content import Blob, Normalized
from normalize.email import EmailContext, normalize_email
from normalize.schema import strip_controls, strip_controls_deep

# Headers that describe the body the provider took apart; the rebuilt message has
# its own.
_BODY_HEADERS = frozenset(
    {"content-type", "content-transfer-encoding", "mime-version", "content-disposition"}
)


@dataclass(frozen=True)
class ParsedAttachment:
    filename: str | None
    content_type: str
    data: bytes
    content_id: str | None = None


@dataclass(frozen=True)
class ParsedEmail:
    """An email as a provider delivers it in fields."""

    headers: Sequence[tuple[str, str]]  # in order, as the provider lists them
    text: str | None = None
    html: str | None = None
    attachments: Sequence[ParsedAttachment] = ()
    provider_message_id: str | None = None
    metadata: Mapping[str, JsonValue] = field(default_factory=dict)


def to_mime(parsed: ParsedEmail) -> tuple[bytes, list[str]]:
    """The MIME bytes, and the names of headers that could not be carried over."""
    message = EmailMessage(policy=policy.SMTP)
    dropped: list[str] = []
    for name, value in parsed.headers:
        if name.lower() in _BODY_HEADERS or not name.strip():
            continue
        try:
            message[name] = value.replace("\r", " ").replace("\n", " ")
        except (HeaderParseError, ValueError, TypeError, IndexError):
            dropped.append(name[:100])
    if parsed.text is not None:
        message.set_content(parsed.text)
    if parsed.html is not None:
        if parsed.text is None:
            message.set_content(parsed.html, subtype="html")
        else:
            message.add_alternative(parsed.html, subtype="html")
    for attachment in parsed.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        if not subtype or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
            cid=_angle(attachment.content_id),
        )
    return message.as_bytes(), dropped


def _angle(content_id: str | None) -> str | None:
    if not content_id:
        return None
    return content_id if content_id.startswith("<") else f"<{content_id}>"


def normalize_parsed_email(parsed: ParsedEmail, raw: Blob, ctx: EmailContext) -> Normalized:
    """Normalize a provider-parsed email; ``raw`` is the provider's payload as received."""
    mime, dropped = to_mime(parsed)
    normalized = normalize_email(mime, ctx)
    metadata: dict[str, JsonValue] = {
        **normalized.message.metadata,
        **parsed.metadata,
        "rebuilt_from_fields": True,
    }
    if dropped:
        metadata["dropped_headers"] = list[JsonValue](dropped)
    provider_id = parsed.provider_message_id
    message = normalized.message.revised(
        raw=raw.ref,
        provider_message_id=strip_controls(provider_id) or None if provider_id else None,
        metadata=strip_controls_deep(metadata),
    )
    # The rebuilt MIME is not kept: the provider's payload is the raw record.
    return Normalized(message=message, blobs=(raw, *normalized.blobs[1:]))
