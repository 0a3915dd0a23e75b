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
(kept as a dead letter with reason ``stale``), or an unreadable one whose token
already carried another message (``replay``, below); 503 not durable (retried).

The signature covers the timestamp and token, not the mail: each token is single
use (:mod:`ingest.replay`). It is bound to a digest of the first mail it carried
(the whole normalized mail, :func:`_fingerprint`), so Mailgun's retry of the same
mail passes as it is. Another mail under a used token is taken without Mailgun's
results, as any stranger's mail on port 25, and marked ``token_reused``; it is not
refused: whoever posts first owns a token, and the genuine mail may be the one
that comes second.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from pydantic import Field, JsonValue, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.exc import SQLAlchemyError

from ingest.errors import Rejected, RetryLater
from ingest.jsonbody import load_json
from ingest.mailauth import mailgun_verdict
from ingest.replay import Claim, UsedTokens
from ingest.sdk import (
    FORM,
    MAX_FORM_PARTS,
    MULTIPART,
    AdapterContext,
    HttpAdapter,
    HttpRoute,
    InboundRequest,
    Part,
)
from normalize.content import Blob, Normalized
from normalize.email import EmailContext, normalize_email
from normalize.errors import NormalizeError
from normalize.parsed_email import ParsedAttachment, ParsedEmail, normalize_parsed_email
from switchboard.metrics import TOKENS_REUSED

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
            # Byte for byte: as Latin-1 each percent escape becomes the one byte it
            # names. parse_qsl on the bytes themselves raised UnicodeEncodeError on
            # any escaped non-ASCII character (an "é" in the text), which made every
            # such mail a normalizer-error dead letter until 2026-12-02.
            text = request.body.decode("latin-1")
            try:
                pairs = parse_qsl(
                    text, keep_blank_values=True, encoding="latin-1", max_num_fields=MAX_FORM_PARTS
                )
            except ValueError as exc:  # as many fields as the multipart path takes parts
                raise NormalizeError("malformed", f"more than {MAX_FORM_PARTS} fields") from exc
            for key, value in pairs:
                name = key.encode("latin-1").decode("utf-8", "replace")
                self.values.setdefault(name, []).append(value.encode("latin-1"))

    def raw(self, name: str) -> bytes | None:
        values = self.values.get(name)
        return values[0] if values else None

    def get(self, name: str) -> str | None:
        value = self.raw(name)
        return None if value is None else value.decode("utf-8", "replace")

    def all(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.values.get(name, [])]


_SIGNED = ("timestamp", "token", "signature")
#: Longest value of a signature field read (Mailgun's: 10, 50 and 64 characters).
_SIGNED_MAX = 256
_URLENCODED_SIGNED = re.compile(rb"(?:^|&)(timestamp|token|signature)=([^&]*)")


def signature_fields(request: InboundRequest) -> dict[str, str]:
    """The signature's three fields (the first of each), without parsing the form."""
    found: dict[str, str] = {}
    if request.media_type != MULTIPART:
        for match in _URLENCODED_SIGNED.finditer(request.body):
            name, value = match.group(1).decode(), match.group(2)[: _SIGNED_MAX * 3]
            found.setdefault(
                name, unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace")
            )
        return found
    _, options = parse_options_header(request.content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise NormalizeError("malformed", "the multipart body has no boundary")
    scan = _SignatureScan()
    parser = MultipartParser(boundary, callbacks=scan.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(request.body)
    except _Enough:
        pass
    except (MultipartParseError, ValueError) as exc:
        if not scan.found:
            raise NormalizeError("malformed", f"unreadable multipart body: {exc}") from exc
    return scan.found


class _Enough(Exception):
    """Stop the scan: every field was found, or the part limit passed."""


class _SignatureScan:
    """Callbacks of python-multipart's streaming parser that keep the signed fields."""

    def __init__(self, max_parts: int = MAX_FORM_PARTS) -> None:
        self.found: dict[str, str] = {}
        self.max_parts = max_parts
        self.parts = 0
        self._header = b""
        self._name: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _Enough
        self._header, self._name, self._value = b"", None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header = data[start:end].lower()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header != b"content-disposition":
            return
        disposition, params = parse_options_header(data[start:end])
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition == b"form-data" and b"filename" not in params and name in _SIGNED:
            self._name = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name is not None and len(self._value) <= _SIGNED_MAX:
            self._value += data[start : min(end, start + _SIGNED_MAX + 1)]

    def _end(self) -> None:
        if self._name is not None:
            self.found.setdefault(self._name, self._value.decode("utf-8", "replace"))
            if len(self.found) == len(_SIGNED):
                raise _Enough


def _verify(settings: MailgunSettings, fields: dict[str, str]) -> None:
    timestamp, token, signature = (fields.get(name) for name in _SIGNED)
    if not (timestamp and token and signature):
        raise Rejected("signature", "timestamp, token and signature are required", status=403)
    key = settings.signing_key.get_secret_value() if settings.signing_key else ""
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not key or not hmac.compare_digest(signature.encode(), expected.encode()):
        raise Rejected("signature", "the signature does not match the signing key", status=403)
    # ASCII digits only: "¹⁷" is isdigit() to Python and then not an int() (a 500).
    numeric = timestamp.isascii() and timestamp.isdigit()
    if not numeric or abs(time.time() - int(timestamp)) > settings.max_age_s:
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
    offload = True  # up to 25 MB of mail, parsed in a parse process once authenticated

    def __init__(self, settings: MailgunSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        # A timestamp passes up to max_age_s either side of now: its token is kept
        # for that whole window, and a minute more.
        self.tokens = UsedTokens(context.engine, keep_s=2 * settings.max_age_s + 60)
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
            406: "Signed too long ago, or unreadable under a used token: not retried, kept "
            "as a dead letter",
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
        # The signature travels inside the body, which anyone may post: only its three
        # fields are read here, by a streaming scan that stops at the part limit, never
        # by the whole-form parse (a stranger's 10 MB of empty parts held the parser
        # for 16 s and 461 MB; review of 2026-12-01).
        try:
            fields = request.once(signature_fields)
        except NormalizeError as exc:
            detail = f"cannot read the signature: {exc.detail}"
            raise Rejected("signature", detail, status=403) from exc
        _verify(self.settings, fields)

    async def normalize(self, request: InboundRequest) -> Normalized:
        try:
            normalized = await super().normalize(request)
        except NormalizeError:
            # Kept whole as a dead letter (200) unless its token already carried
            # something else: else a captured signature could store 30 MB of junk
            # again and again (review of 2026-12-02).
            claim = await self._claim(request, lambda: _unparsed(request.body))
            if not claim.fresh:
                raise Rejected(
                    "replay",
                    "an unreadable mail under a signature token that already carried "
                    f"another message ({claim.first_message_id}); kept for review",
                    status=406,  # Mailgun does not retry it
                    record=True,
                    metadata={
                        "first_message_id": claim.first_message_id,
                        "conflicts": claim.conflicts,
                    },
                ) from None
            raise
        claim = await self._claim(request, lambda: _fingerprint(normalized))
        if claim.fresh:
            return normalized
        # Another mail under a used token: a leaked signature, or (should a stranger
        # holding an unused one have posted first) the genuine mail itself. Refusing
        # it would lose the genuine mail in the second case, so it is taken as the
        # port-25 baseline takes any stranger's mail: without Mailgun's results (its
        # sender is claimed either way: they never verify one), and marked (review of
        # 2026-12-02).
        TOKENS_REUSED.labels(self.name).inc()
        log.warning(
            "a Mailgun signature token carried another mail: taken without its verdict",
            extra={
                "message_id": str(request.message_id),
                "first_message_id": claim.first_message_id,
                "conflicts": claim.conflicts,
            },
        )
        return _unvouched(normalized, claim)

    async def _claim(self, request: InboundRequest, carried: Callable[[], str]) -> Claim:
        """Bind the request's token to what it carries (see ingest.replay). ``carried``
        runs on the thread too: digesting up to 30 MB is no work for the event loop."""
        token = request.once(signature_fields)["token"]

        def claim() -> Claim:
            return self.tokens.claim(self.name, token, carried(), str(request.message_id))

        try:
            return await asyncio.to_thread(claim)
        except SQLAlchemyError as exc:
            # Not checked, not taken: Mailgun retries a 503 for hours.
            log.error("cannot check the Mailgun token", extra={"error": repr(exc)})
            raise RetryLater("cannot check the request's token; try again") from exc

    def parse(self, request: InboundRequest) -> Normalized:
        form = request.once(MailgunForm)
        ctx = EmailContext(
            adapter=self.name,
            message_id=request.message_id,
            received_at=request.received_at,
            mail_from=form.get("sender"),
            rcpt_tos=tuple(r.strip() for r in (form.get("recipient") or "").split(",") if r),
            # The signed timestamp, as authentication read it: the form's own parse
            # reads escaped field names (``ti%6Destamp=``) that the signature scan
            # does not, so its copy could differ from what was verified.
            metadata={"mailgun": {"timestamp": request.once(signature_fields).get("timestamp")}},
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


def _unvouched(normalized: Normalized, claim: Claim) -> Normalized:
    """``normalized`` without what Mailgun's results gave it, its authentication,
    and with the token's first message named in metadata. Its identities stay as
    they are: Mailgun's results never verify a sender (``mailgun_verdict``)."""
    message = normalized.message
    metadata: dict[str, JsonValue] = {
        **message.metadata,
        "token_reused": {"first_message_id": claim.first_message_id, "conflicts": claim.conflicts},
    }
    revised = message.revised(authentication=None, metadata=metadata)
    return Normalized(message=revised, blobs=normalized.blobs)


def _unparsed(body: bytes) -> str:
    """What an unreadable mail's token is bound to: its body's digest."""
    return "unparsed:" + hashlib.sha256(body).hexdigest()


def _fingerprint(normalized: Normalized) -> str:
    """What a token is bound to: the whole normalized message (HTML, recipients,
    thread, verdict, metadata), not its dedupe key alone, which covers only the
    Message-ID, sender, subject, text and attachments (review of 2026-12-02: the same
    key with another HTML and other recipients passed). Without what differs per
    arrival (its id and time, the raw payload with its multipart boundary) and with
    the attachments in a fixed order, so Mailgun's retry of the same mail, in either
    encoding and any field order, has the same fingerprint."""
    data = normalized.message.model_dump(mode="json", exclude={"id", "received_at", "raw"})
    # Nor the signed timestamp: only the key's holder can sign another one for a
    # token, and a retry that Mailgun signs anew is still the same mail.
    data["metadata"].pop("mailgun", None)
    data["attachments"] = sorted(data["attachments"], key=lambda a: json.dumps(a, sort_keys=True))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "message:" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


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
