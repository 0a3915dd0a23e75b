"""Mailgun inbound routes: ``forward("https://<host>/webhooks/mailgun")``.

Both of Mailgun's formats are taken: the parsed form (``message-headers``,
``body-plain``, ``body-html``, ``attachment-N``) and raw MIME (``body-mime``,
sent when the route's URL ends in ``mime``: point it at
``/webhooks/mailgun/mime``). Either way the mail goes through the email
normalizer, so its dedupe key is its Message-ID, as over SMTP or IMAP.

Every request is signed: ``signature`` is the hex HMAC-SHA256 of
``timestamp + token`` under the account's HTTP webhook signing key
(``SWITCHBOARD_MAILGUN_SIGNING_KEY``). Answers follow Mailgun's retry rules:
200 accepted (or kept as a dead letter); 403 bad or missing signature (Mailgun
retries for 8 hours, so a mistyped key loses nothing once fixed); 406 a
correctly signed request older than ``max_age_s``, which Mailgun must not retry
(kept as a dead letter with reason ``stale``); 503 not durable (retried).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any
from urllib.parse import parse_qsl

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.errors import Rejected
from ingest.jsonbody import load_json
from ingest.mailauth import mailgun_verdict
from ingest.sdk import FORM, MULTIPART, AdapterContext, HttpAdapter, HttpRoute, InboundRequest, Part
from normalize.content import Blob, Normalized
from normalize.email import EmailContext, normalize_email
from normalize.errors import NormalizeError
from normalize.parsed_email import ParsedAttachment, ParsedEmail, normalize_parsed_email

log = logging.getLogger(__name__)

PATH = "/webhooks/mailgun"


class MailgunSettings(BaseSettings):
    """[adapters.mailgun]; the signing key from SWITCHBOARD_MAILGUN_SIGNING_KEY."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_MAILGUN_", extra="forbid")

    signing_key: SecretStr | None = Field(
        default=None,
        description="HTTP webhook signing key (Mailgun: Sending > Webhooks). Keep it in the env.",
    )
    max_age_s: int = Field(
        default=300, ge=30, le=86_400, description="Refuse signed requests older than this."
    )
    max_body_bytes: int = Field(
        default=30 * 1024 * 1024, ge=1024, description="Largest request (Mailgun allows 25 MB)."
    )


class MailgunForm:
    """A Mailgun request's fields, from either encoding it uses, kept as bytes (raw
    MIME need not be UTF-8; the parsed fields are, Mailgun says)."""

    def __init__(self, request: InboundRequest) -> None:
        self.files: list[Part] = []
        self.values: dict[str, list[bytes]] = {}
        if request.media_type == MULTIPART:
            for part in request.parts():
                if part.filename is not None:
                    self.files.append(part)
                else:
                    self.values.setdefault(part.name, []).append(part.data)
        else:
            for key, value in parse_qsl(request.body, keep_blank_values=True):
                self.values.setdefault(key.decode("utf-8", "replace"), []).append(value)

    def raw(self, name: str) -> bytes | None:
        values = self.values.get(name)
        return values[0] if values else None

    def get(self, name: str) -> str | None:
        value = self.raw(name)
        return None if value is None else value.decode("utf-8", "replace")

    def all(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.values.get(name, [])]


def _verify(settings: MailgunSettings, form: MailgunForm) -> None:
    timestamp, token, signature = form.get("timestamp"), form.get("token"), form.get("signature")
    if not (timestamp and token and signature):
        raise Rejected("signature", "timestamp, token and signature are required", status=403)
    key = settings.signing_key.get_secret_value() if settings.signing_key else ""
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not key or not hmac.compare_digest(signature.encode(), expected.encode()):
        raise Rejected("signature", "the signature does not match the signing key", status=403)
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > settings.max_age_s:
        raise Rejected(
            "stale",
            f"signed more than {settings.max_age_s}s ago (or in the future): a replay or a "
            "very late retry; kept for review",
            status=406,
            record=True,
        )


class MailgunAdapter(HttpAdapter[MailgunSettings]):
    """Mailgun inbound routes, parsed or raw MIME, signature checked."""

    name = "mailgun"
    summary = "Mailgun inbound routes at POST /webhooks/mailgun[/mime], signature checked"
    settings_class = MailgunSettings
    malformed = "dead-letter"  # signed by Mailgun: keep it, and stop its retries
    # The signature is inside a multipart form of up to 30 MB, which strangers post.
    offload = ("authenticate", "parse")
    unreadable_status = 406  # Mailgun retries any other refusal for hours

    def __init__(self, settings: MailgunSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        if settings.signing_key is None:
            log.warning(
                "no Mailgun signing key configured (SWITCHBOARD_MAILGUN_SIGNING_KEY): every "
                "request to %s will be refused with 403",
                PATH,
            )

    def routes(self) -> list[HttpRoute]:
        responses = {
            200: "Durable, or kept as a dead letter",
            403: "Signature missing or wrong (Mailgun retries)",
            406: "Signed too long ago: not retried, kept as a dead letter",
            413: "Body too large",
            503: "Not durable; Mailgun retries",
        }
        common: dict[str, Any] = {
            "content_types": (MULTIPART, FORM),
            "max_body_bytes": self.settings.max_body_bytes,
            "responses": responses,
        }
        return [
            HttpRoute(PATH, summary="Mailgun route, parsed message", **common),
            HttpRoute(f"{PATH}/mime", summary="Mailgun route, raw MIME", **common),
        ]

    def authenticate(self, request: InboundRequest) -> None:
        try:
            form = request.once(MailgunForm)
        except NormalizeError as exc:
            detail = f"cannot read the signature: {exc.detail}"
            raise Rejected("signature", detail, status=403) from exc
        _verify(self.settings, form)

    def parse(self, request: InboundRequest) -> Normalized:
        form = request.once(MailgunForm)
        ctx = EmailContext(
            adapter=self.name,
            message_id=request.message_id,
            received_at=request.received_at,
            mail_from=form.get("sender"),
            rcpt_tos=tuple(r.strip() for r in (form.get("recipient") or "").split(",") if r),
            metadata={"mailgun": {"timestamp": form.get("timestamp")}},
            verdict=mailgun_verdict(
                form.get("X-Mailgun-Spf"),
                form.get("X-Mailgun-Dkim-Check-Result"),
                form.get("sender"),
            ),
        )
        mime = form.raw("body-mime")
        if mime is not None:
            return normalize_email(mime, ctx)
        return normalize_parsed_email(_parsed(form), Blob.of(request.body, request.media_type), ctx)


def _parsed(form: MailgunForm) -> ParsedEmail:
    headers = load_json(form.get("message-headers") or "", "message-headers")
    try:
        if not isinstance(headers, list):
            raise TypeError("not a list")
        pairs = [(str(name), str(value)) for name, value in headers]
    except (ValueError, TypeError) as exc:
        raise NormalizeError("malformed", "message-headers is not a JSON list of pairs") from exc
    attachments = [
        ParsedAttachment(part.filename, part.content_type, part.data)
        for part in form.files
        if part.name.startswith("attachment")
    ]
    html = form.all("body-html")
    return ParsedEmail(
        headers=pairs,
        text=form.get("body-plain"),
        html="\n".join(html) if html else None,
        attachments=attachments,
    )
