"""SendGrid Inbound Parse: ``POST /webhooks/sendgrid``, multipart/form-data.

With "POST the raw, full MIME message" ticked, SendGrid sends the mail as the
``email`` field and it goes through the email normalizer unchanged; otherwise the
parsed fields (``headers``, ``text``, ``html``, ``attachmentN`` with
``attachment-info``) are put back together first, each field decoded with the
charset SendGrid names for it in ``charsets``. ``envelope`` gives the SMTP
sender and recipients in both modes.

Inbound Parse does not sign its requests: give the URL HTTP Basic credentials
(``https://sendgrid:<password>@host/webhooks/sendgrid``, password in
``SWITCHBOARD_SENDGRID_PASSWORD``). SendGrid retries only on 5xx and drops the
mail on any 4xx, so: 503 when not durable (retried for up to 3 days); 401 for
missing or wrong credentials (forged requests; a wrong password in the URL loses
mail, and each refusal is logged at WARNING); everything SendGrid sent that
cannot be read is kept as a dead letter and answered 200.
"""

from __future__ import annotations

import codecs
import dataclasses
from email.parser import HeaderParser
from email.policy import compat32

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ingest.jsonbody import load_json
from ingest.mailauth import from_domain_of, sendgrid_verdict
from ingest.sdk import MULTIPART, BasicAuthAdapter, BasicAuthSettings, InboundRequest, Part
from normalize.content import Blob, Normalized
from normalize.email import EmailContext, normalize_email
from normalize.errors import NormalizeError
from normalize.parsed_email import ParsedAttachment, ParsedEmail, normalize_parsed_email

PATH = "/webhooks/sendgrid"


class SendgridSettings(BasicAuthSettings):
    """[adapters.sendgrid]; the password from SWITCHBOARD_SENDGRID_PASSWORD."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_SENDGRID_", extra="forbid")

    username: str = Field(default="sendgrid", description="HTTP Basic user in the Parse URL.")
    max_body_bytes: int = Field(
        default=40 * 1024 * 1024, ge=1024, description="Largest request (SendGrid: 30 MB mail)."
    )


def _charset(name: str | None) -> str:
    try:
        return codecs.lookup(name or "utf-8").name
    except LookupError:
        return "utf-8"


class SendgridForm:
    def __init__(self, request: InboundRequest) -> None:
        parts = request.parts()
        self.fields: dict[str, Part] = {}
        self.files: dict[str, Part] = {}
        for part in parts:
            target = self.files if part.filename is not None else self.fields
            target.setdefault(part.name, part)
        self.charsets: dict[str, object] = self.json_field("charsets") or {}

    def json_field(self, name: str) -> dict[str, object] | None:
        part = self.fields.get(name)
        if part is None:
            return None
        value = load_json(part.data, name)
        if not isinstance(value, dict):
            raise NormalizeError("malformed", f"{name} is not a JSON object")
        return value

    def text(self, name: str) -> str | None:
        part = self.fields.get(name)
        if part is None:
            return None
        return part.data.decode(_charset(str(self.charsets.get(name, "utf-8"))), "replace")

    def envelope(self) -> tuple[str | None, tuple[str, ...]]:
        envelope = self.json_field("envelope") or {}
        sender = envelope.get("from")
        to = envelope.get("to")
        recipients = tuple(str(r) for r in to) if isinstance(to, list) else ()
        return (str(sender) if sender is not None else None), recipients


class SendgridAdapter(BasicAuthAdapter[SendgridSettings]):
    """SendGrid Inbound Parse, raw or parsed, behind HTTP Basic."""

    name = "sendgrid"
    summary = "SendGrid Inbound Parse at POST /webhooks/sendgrid, raw MIME or parsed fields"
    settings_class = SendgridSettings
    path = PATH
    media_type = MULTIPART
    provider = "SendGrid"
    on_unauthorized = "SendGrid does not retry"  # any 4xx drops the mail there

    offload = True  # mail, parsed in a parse process

    def parse(self, request: InboundRequest) -> Normalized:
        form = SendgridForm(request)
        mail_from, rcpt_tos = form.envelope()
        ctx = EmailContext(
            adapter=self.name,
            message_id=request.message_id,
            received_at=request.received_at,
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            metadata={"sendgrid": {"spam_score": form.text("spam_score"), "spf": form.text("SPF")}},
        )
        raw = form.fields.get("email")
        header_block = raw.data if raw is not None else (form.text("headers") or "").encode()
        verdict = sendgrid_verdict(
            form.text("SPF"), form.text("dkim"), mail_from, from_domain_of(header_block)
        )
        ctx = dataclasses.replace(ctx, verdict=verdict)
        if raw is not None:
            return normalize_email(raw.data, ctx)
        return normalize_parsed_email(
            _parsed(form), Blob.of(request.body, request.content_type), ctx
        )


def _parsed(form: SendgridForm) -> ParsedEmail:
    header_text = form.text("headers")
    if header_text:
        pairs = list(HeaderParser(policy=compat32).parsestr(header_text).items())
    else:  # "headers" is always sent; without it, the few fields SendGrid repeats
        pairs = [(n.title(), v) for n in ("from", "to", "cc", "subject") if (v := form.text(n))]
    if not any(name.lower() == "from" for name, _ in pairs):
        raise NormalizeError("no-sender", "neither headers nor from name a sender")
    info = form.json_field("attachment-info") or {}
    attachments = []
    for field_name, part in sorted(form.files.items()):
        meta = info.get(field_name)
        meta = meta if isinstance(meta, dict) else {}
        attachments.append(
            ParsedAttachment(
                filename=str(meta.get("filename") or part.filename or field_name),
                content_type=str(meta.get("type") or part.content_type),
                data=part.data,
                content_id=str(meta["content-id"]) if meta.get("content-id") else None,
            )
        )
    return ParsedEmail(
        headers=pairs, text=form.text("text"), html=form.text("html"), attachments=attachments
    )
