"""The Twilio adapter: SMS, MMS and WhatsApp at ``POST /webhooks/twilio/sms``.

The signature is checked with the ``twilio`` package's RequestValidator over
the public URL Twilio called (``SWITCHBOARD_PUBLIC_URL`` behind a proxy) and
the form with blank values kept. A refused request answers 403 and is recorded
in the dead letter topic with reason ``signature``, never silently dropped.
Twilio is answered with empty TwiML only after the Kafka acknowledgement.
"""

from __future__ import annotations

import functools
import hmac
import logging
import ssl
from urllib.parse import urlsplit

import httpx
from fastapi import Response
from pydantic import JsonValue
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from ingest.errors import Rejected
from ingest.sdk import (
    FORM,
    AdapterContext,
    AdapterTables,
    HttpAdapter,
    HttpRoute,
    InboundRequest,
    parse_form,
)
from ingest.settings import TwilioSettings
from normalize.content import Blob, Normalized
from normalize.schema import Attachment, strip_controls
from normalize.sms import SmsContext, bad_sids, normalize_twilio

log = logging.getLogger(__name__)

PATH = "/webhooks/twilio/sms"
# Twilio's requests are a few KB: about 30 fields, two more per media item (at most
# 10), a body of at most 1,600 characters (WhatsApp: 4,096, 12 KB encoded). These
# bounds hold what Twilio sends with room to spare and keep a stranger's unsigned post
# cheap to refuse: 256 KB of 34,000 empty fields cost 118 ms of the event loop to
# parse and check (the signature covers every field, sorted), and 48 of them a second
# left customers waiting 14 s (attacker review, 2026-11-30).
MAX_BODY = 64 * 1024
MAX_FIELDS = 200
EMPTY_TWIML = str(MessagingResponse())


class _Form(dict[str, str]):
    """The decoded form, with the ``getall`` RequestValidator looks for first: on a
    plain dict it tries two missing methods before indexing, two exceptions a field."""

    def getall(self, name: str) -> list[str]:
        return [self[name]]


def _twilio_form(request: InboundRequest) -> dict[str, str]:
    # Twilio signs what it sent; decode leniently so the check sees the same. The
    # field count is checked before any field is built (the route's max_form_fields).
    return _Form(
        parse_form(
            request.body,
            max_fields=request.route.max_form_fields,
            max_field_bytes=request.route.max_body_bytes,
            errors="replace",
        )
    )


def signed(validator: RequestValidator, url: str, form: dict[str, str], signature: str) -> bool:
    """Whether ``signature`` is Twilio's over ``url`` and ``form``, by the library.

    The URL as received is what Twilio signs in the usual case: one HMAC, by the
    library's ``compute_signature``. Only when that fails does its ``validate`` run,
    which tries the URL without and with its port, two HMACs (57 µs against 10 for
    a ten-field form here, 2026-11-30)."""
    computed: str = validator.compute_signature(url, form)
    if hmac.compare_digest(computed.encode(), signature.encode()):
        return True
    return bool(validator.validate(url, form, signature))


class TwilioAdapter(HttpAdapter[TwilioSettings]):
    """Twilio's SMS, MMS and WhatsApp web hook, signature checked."""

    name = "twilio"
    summary = "Twilio hook: SMS, MMS and WhatsApp at POST /webhooks/twilio/sms"
    settings_class = TwilioSettings
    # A message Twilio signed but we cannot read is kept, and Twilio is told it
    # arrived: its retries would fail the same way.
    malformed = "dead-letter"

    @classmethod
    def configured_in(cls, settings: AdapterTables) -> bool:
        return cls.settings_from(settings).enabled  # on unless switched off

    def __init__(self, settings: TwilioSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        self._validators = [RequestValidator(t.get_secret_value()) for t in settings.auth_token]
        if not settings.enforce_signature:
            log.warning(
                "TWILIO SIGNATURE CHECK IS OFF: anyone can post fake SMS to %s "
                "(SWITCHBOARD_TWILIO_ENFORCE_SIGNATURE=false)",
                PATH,
            )
        elif not self._validators:
            log.warning(
                "no Twilio auth token configured (SWITCHBOARD_TWILIO_AUTH_TOKEN): every "
                "request to %s will be refused with 403 and dead-lettered",
                PATH,
            )
        self._accounts = frozenset(settings.account_sids)
        if not self._accounts:
            log.warning(
                "no Twilio account configured (SWITCHBOARD_TWILIO_ACCOUNT_SIDS): messages "
                "signed with the token are accepted whatever AccountSid they name"
            )

    def routes(self) -> list[HttpRoute]:
        return [
            HttpRoute(
                PATH,
                summary="Twilio inbound SMS, MMS and WhatsApp",
                description=(
                    "Form-encoded as Twilio sends it, signed with X-Twilio-Signature. Answers "
                    "200 with empty TwiML once the message is durable; 403 for a bad or "
                    "missing signature (recorded as a dead letter); 503 with Retry-After "
                    "when it cannot be made durable."
                ),
                content_types=(FORM,),
                max_body_bytes=MAX_BODY,
                max_form_fields=MAX_FIELDS,
                responses={
                    200: "Accepted (empty TwiML)",
                    403: "Signature missing or invalid, a malformed SID, or another account",
                    413: "Body over 64 KB or more than 200 fields",
                    415: "Not form-encoded",
                    503: "Not durable; Twilio retries",
                },
            )
        ]

    @staticmethod
    def _form(request: InboundRequest) -> dict[str, str]:
        return request.once(_twilio_form)

    def authenticate(self, request: InboundRequest) -> None:
        form = self._form(request)
        if self.settings.enforce_signature:
            signature = request.headers.get("x-twilio-signature")
            if not signature or not any(
                signed(v, request.url, form, signature) for v in self._validators
            ):
                raise Rejected(
                    "signature",
                    f"X-Twilio-Signature is missing or not valid for {request.url}",
                    status=403,
                    record=True,
                    metadata={"url": request.url, "signature_present": signature is not None},
                )
        # A valid signature does not make the fields what they look like (see
        # normalize.sms.MESSAGE_SID): a SID of the wrong shape is a replay with
        # fields folded together, kept as evidence. A request without any SID is
        # left to the normalizer (missing-field), as before.
        if bad := bad_sids(form):
            raise Rejected(
                "invalid-sid",
                f"{', '.join(bad)} is not a Twilio message SID (SM or MM + 32 hex digits)",
                status=403,
                record=True,
            )
        if self._accounts and form.get("AccountSid") not in self._accounts:
            raise Rejected(
                "account",
                "AccountSid is not one of the accounts configured for this hook",
                status=403,
                record=True,
                metadata={"account_sid": form.get("AccountSid", "")[:64]},
            )

    def dead_letter_metadata(self, request: InboundRequest) -> dict[str, JsonValue]:
        return {"message_sid": self._form(request).get("MessageSid", "")[:64]}

    async def normalize(self, request: InboundRequest) -> Normalized:
        normalized = normalize_twilio(
            self._form(request),
            SmsContext(
                adapter=self.name,
                message_id=request.message_id,
                received_at=request.received_at,
                raw=Blob.of(request.body, FORM),
                default_region=self.settings.default_region,
                signed=self.settings.enforce_signature,
            ),
        )
        if self.settings.download_media and normalized.message.attachments:
            normalized = await self._download_media(normalized)
        return normalized

    def accepted(self, request: InboundRequest, normalized: Normalized | None) -> Response:
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def _download_media(self, normalized: Normalized) -> Normalized:
        """Fetch media from allowlisted hosts only, bounded in size and time.

        A failure keeps the provider URL and notes the error; it never loses the message.
        """
        attachments: list[Attachment] = []
        blobs = list(normalized.blobs)
        errors: list[str] = []
        for attachment in normalized.message.attachments:
            if attachment.url is None:
                attachments.append(attachment)
                continue
            try:
                data = await self._fetch(attachment.url)
            except MediaRefused as exc:
                errors.append(strip_controls(str(exc), body=True))
                attachments.append(attachment)
                continue
            blob = Blob.of(data, attachment.content_type)
            blobs.append(blob)
            attachments.append(
                attachment.revised(blob=blob.ref, sha256=blob.ref.sha256, size=blob.ref.size)
            )
        metadata = dict(normalized.message.metadata)
        if errors:
            metadata["media_errors"] = list[object](errors)  # type: ignore[assignment]
        message = normalized.message.revised(attachments=tuple(attachments), metadata=metadata)
        return Normalized(message=message, blobs=tuple(blobs))

    @functools.cached_property
    def _media_tls(self) -> ssl.SSLContext:
        """One TLS context for every media download, built at the first: a new client
        builds its own from the CA bundle, 31 ms of CPU on the event loop for each
        attachment (2026-12-01, the 2-core machine), more than fetching a small image."""
        return httpx.create_ssl_context()

    async def _fetch(self, url: str) -> bytes:
        limit = self.settings.media_max_bytes
        allowed = {h.lower() for h in self.settings.media_hosts}
        timeout = httpx.Timeout(self.settings.media_timeout_s)
        async with httpx.AsyncClient(
            follow_redirects=False, timeout=timeout, verify=self._media_tls
        ) as client:
            for _hop in range(4):  # Twilio answers with one redirect to its CDN
                parts = urlsplit(url)
                if parts.scheme not in ("https", "http") or (parts.hostname or "") not in allowed:
                    raise MediaRefused(f"media host not allowed: {parts.hostname!r}")
                try:
                    async with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = str(response.next_request.url) if response.next_request else ""
                            continue
                        if response.status_code != 200:
                            raise MediaRefused(f"media fetch answered {response.status_code}")
                        data = bytearray()
                        async for chunk in response.aiter_bytes():
                            data += chunk
                            if len(data) > limit:
                                raise MediaRefused(f"media larger than {limit} bytes")
                        return bytes(data)
                except httpx.HTTPError as exc:
                    raise MediaRefused(f"media fetch failed: {type(exc).__name__}") from exc
        raise MediaRefused("too many redirects")


class MediaRefused(Exception):
    """The media was not fetched (host, size, time, status)."""
