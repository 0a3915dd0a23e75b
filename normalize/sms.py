"""Twilio's inbound message webhook (SMS, MMS, WhatsApp) -> InboundMessage. Pure.

Twilio adds fields without notice; every field we do not map is kept verbatim
in ``metadata["twilio"]``, never rejected.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.identity import IdentityError, canonical_phone, phone_identity
from normalize.schema import (
    Attachment,
    Authentication,
    Channel,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    strip_controls,
)

_MAPPED = {"MessageSid", "SmsSid", "SmsMessageSid", "From", "To", "Body", "NumMedia"}
MAX_MEDIA = 10  # Twilio's own limit per message
SID_FIELDS = ("MessageSid", "SmsMessageSid", "SmsSid")
# Twilio signs its form as keys and values concatenated without separators, so a
# captured request re-sent with the next field folded into MessageSid
# ("SM...NumMedia0") still validates; the exact shape of a SID is what refuses it.
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")


def bad_sids(form: Mapping[str, str]) -> list[str]:
    """The SID fields present whose value is not a Twilio message SID."""
    return [f for f in SID_FIELDS if f in form and not MESSAGE_SID.fullmatch(form[f])]


@dataclass(frozen=True)
class SmsContext:
    adapter: str
    message_id: UUID
    received_at: datetime
    raw: Blob  # the request body as received
    default_region: str | None = None
    # True when Twilio's signature was checked: the number then comes from the
    # carrier through Twilio, not from whoever typed the request.
    signed: bool = False


def normalize_twilio(form: Mapping[str, str], ctx: SmsContext) -> Normalized:
    # The signature was checked on the form as sent; from here on, no controls
    # (the body and unknown fields keep tab, CR and LF).
    form = {
        strip_controls(k): strip_controls(v, body=k == "Body" or k not in _MAPPED)
        for k, v in form.items()
    }
    sid = form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid")
    if not sid:
        raise NormalizeError("missing-field", "no MessageSid in the Twilio request")
    if bad := bad_sids(form):
        raise NormalizeError("invalid-sid", f"{', '.join(bad)} is not SM/MM + 32 hex digits")
    raw_from = form.get("From", "")
    whatsapp = raw_from.lower().startswith("whatsapp:")
    try:
        sender = phone_identity(
            raw_from,
            ctx.default_region,
            verified_by="twilio-signature" if ctx.signed else None,
        )
    except IdentityError as exc:
        raise NormalizeError("invalid-sender", f"From {raw_from!r}: {exc}") from exc

    recipients: list[Recipient] = []
    # The company's own number; an odd value there must not lose the message.
    with contextlib.suppress(IdentityError):
        if form.get("To"):
            recipients.append(
                Recipient(
                    kind=IdentityKind.PHONE,
                    value=canonical_phone(form["To"], ctx.default_region),
                    role=RecipientRole.TO,
                )
            )

    attachments: list[Attachment] = []
    try:
        media_count = min(int(form.get("NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        media_count = 0
    for index in range(media_count):
        url = form.get(f"MediaUrl{index}")
        if url:
            attachments.append(
                Attachment(
                    content_type=(
                        form.get(f"MediaContentType{index}") or "application/octet-stream"
                    )
                    .strip()
                    .lower()[:255],
                    url=url[:2048],
                )
            )

    channel = Channel.WHATSAPP if whatsapp else Channel.MMS if attachments else Channel.SMS
    body = form.get("Body", "")
    text = body.replace("\r\n", "\n").strip() or None
    extras = {
        key: value
        for key, value in form.items()
        if key not in _MAPPED and not key.startswith(("MediaUrl", "MediaContentType"))
    }
    message = InboundMessage(
        id=ctx.message_id,
        channel=channel,
        adapter=ctx.adapter,
        received_at=ctx.received_at,
        sender=sender,
        recipients=tuple(recipients),
        text=text,
        text_new=text,
        attachments=tuple(attachments),
        provider_message_id=sid,
        dedupe_key=f"twilio:{sid}",
        authentication=Authentication(source="twilio-signature") if ctx.signed else None,
        raw=ctx.raw.ref,
        metadata={"twilio": dict(extras)},
    )
    return Normalized(message=message, blobs=(ctx.raw,))
