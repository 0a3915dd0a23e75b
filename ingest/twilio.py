"""The Twilio adapter: SMS, MMS and WhatsApp at ``POST /webhooks/twilio/sms``.

The signature is checked with the ``twilio`` package's RequestValidator over
the public URL Twilio called (``SWITCHBOARD_PUBLIC_URL`` behind a proxy) and
the form with blank values kept. A refused request answers 403 and is recorded
in the dead letter topic with reason ``signature``, never silently dropped.
Twilio is answered with empty TwiML only after the Kafka acknowledgement.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import httpx
import uuid6
from fastapi import APIRouter, Request, Response
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from ingest.errors import RetryLater
from ingest.handoff import HandOff
from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.schema import Attachment
from normalize.sms import SmsContext, normalize_twilio
from switchboard.http import counted, problem, read_body, unavailable
from switchboard.settings import Settings, TwilioSettings

log = logging.getLogger(__name__)

PATH = "/webhooks/twilio/sms"
FORM = "application/x-www-form-urlencoded"
MAX_BODY = 256 * 1024  # Twilio's requests are a few KB
EMPTY_TWIML = str(MessagingResponse())


def signed_url(request: Request, public_url: str | None) -> str:
    """The URL Twilio signed: the public base when configured, else what we saw."""
    if not public_url:
        return str(request.url)
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{public_url.rstrip('/')}{request.url.path}{query}"


class TwilioAdapter:
    """Twilio's SMS, MMS and WhatsApp web hook, signature checked."""

    name = "twilio"
    summary = "Twilio hook: SMS, MMS and WhatsApp at POST /webhooks/twilio/sms"
    settings_class = TwilioSettings

    @staticmethod
    def enabled_in(settings: Settings) -> bool:
        return settings.twilio.enabled

    def __init__(
        self, settings: TwilioSettings, handoff: HandOff, public_url: str | None = None
    ) -> None:
        self.settings = settings
        self.handoff = handoff
        self.public_url = public_url
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

    def router(self) -> APIRouter:
        router = APIRouter(tags=["webhooks"])
        router.add_api_route(
            PATH,
            self.receive,
            methods=["POST"],
            summary="Twilio inbound SMS, MMS and WhatsApp",
            description=(
                "Form-encoded as Twilio sends it, signed with X-Twilio-Signature. Answers "
                "200 with empty TwiML once the message is durable; 403 for a bad or "
                "missing signature (recorded as a dead letter); 503 with Retry-After when "
                "it cannot be made durable."
            ),
            response_class=Response,
            responses={
                200: {"content": {"text/xml": {}}, "description": "Accepted (empty TwiML)"},
                403: {"description": "Signature missing or invalid"},
                413: {"description": "Body too large"},
                415: {"description": "Not form-encoded"},
                503: {"description": "Not durable; Twilio retries"},
            },
        )
        return router

    def _signature_ok(self, url: str, form: dict[str, str], signature: str | None) -> bool:
        if not signature:
            return False
        return any(v.validate(url, form, signature) for v in self._validators)

    async def receive(self, request: Request) -> Response:
        return await counted(self.name, self._receive(request))

    async def _receive(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != FORM:
            return problem(415, "Unsupported media type", f"expected {FORM}")
        body = await read_body(request, MAX_BODY)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        message_id = uuid6.uuid7()
        raw = Blob.of(body, FORM)
        url = signed_url(request, self.public_url)
        if self.settings.enforce_signature and not self._signature_ok(
            url, form, request.headers.get("x-twilio-signature")
        ):
            return await self._refuse(request, message_id, raw, url, form)
        try:
            normalized = normalize_twilio(
                form,
                SmsContext(
                    adapter=self.name,
                    message_id=message_id,
                    received_at=datetime.now(UTC),
                    raw=raw,
                    default_region=self.settings.default_region,
                ),
            )
            if self.settings.download_media and normalized.message.attachments:
                normalized = await self._download_media(normalized)
            await self.handoff.deliver(normalized)
        except NormalizeError as exc:
            try:
                await self.handoff.dead_letter(
                    id=message_id,
                    adapter=self.name,
                    reason=exc.reason,
                    detail=exc.detail,
                    raw=raw,
                    metadata={"message_sid": form.get("MessageSid")},
                )
            except RetryLater as retry:
                return unavailable(retry.retry_after_s)
        except RetryLater as exc:
            return unavailable(exc.retry_after_s)
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def _refuse(
        self, request: Request, message_id: UUID, raw: Blob, url: str, form: dict[str, str]
    ) -> Response:
        log.warning(
            "twilio request refused: bad or missing signature",
            extra={"url": url, "message_sid": form.get("MessageSid")},
        )
        try:
            await self.handoff.dead_letter(
                id=message_id,
                adapter=self.name,
                reason="signature",
                detail=f"X-Twilio-Signature missing or not valid for {url}",
                raw=raw,
                metadata={
                    "url": url,
                    "peer": request.client.host if request.client else None,
                    "message_sid": form.get("MessageSid"),
                    "signature_present": "x-twilio-signature" in request.headers,
                },
            )
        except RetryLater:
            log.error("could not record the refused twilio request", extra={"url": url})
        return problem(403, "Forbidden", "X-Twilio-Signature is missing or not valid")

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
                errors.append(str(exc))
                attachments.append(attachment)
                continue
            blob = Blob.of(data, attachment.content_type)
            blobs.append(blob)
            attachments.append(
                attachment.model_copy(
                    update={"blob": blob.ref, "sha256": blob.ref.sha256, "size": blob.ref.size}
                )
            )
        metadata = dict(normalized.message.metadata)
        if errors:
            metadata["media_errors"] = list[object](errors)  # type: ignore[assignment]
        message = normalized.message.model_copy(
            update={"attachments": tuple(attachments), "metadata": metadata}
        )
        return Normalized(message=message, blobs=tuple(blobs))

    async def _fetch(self, url: str) -> bytes:
        limit = self.settings.media_max_bytes
        allowed = {h.lower() for h in self.settings.media_hosts}
        timeout = httpx.Timeout(self.settings.media_timeout_s)
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
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
