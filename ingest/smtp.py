"""The SMTP adapter: an aiosmtpd server that answers 250 only once mail is durable.

The handler owns every reply code. aiosmtpd turns an exception in a hook into a
bare ``500``, which tells the sending server the mail is refused forever; here
a hand-off failure is ``451 4.3.0`` (retry later), and a message that cannot
be normalized is still accepted, stored raw and dead-lettered with the reason:
the sender did nothing wrong and the mail must not be lost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import uuid6
from aiosmtpd.smtp import SMTP, Envelope, Session

from ingest.errors import Rejected, RetryLater, Stop
from ingest.sdk import Adapter, AdapterContext
from ingest.workers import ParserPool
from normalize.content import Blob
from normalize.email import EmailContext, normalize_email
from normalize.errors import NormalizeError
from normalize.identity import IdentityError, canonical_email
from switchboard.metrics import RECEIVED, REJECTED
from switchboard.runtime import StartupError
from switchboard.settings import Settings, SmtpSettings

log = logging.getLogger(__name__)

# aiosmtpd's own replies lack enhanced status codes (RFC 3463); senders and their
# logs are clearer with them.
_REWRITES = {
    "552 Error: Too much mail data": "552 5.3.4 Message exceeds the maximum size",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message exceeds the maximum size"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
}
TOO_MANY_SESSIONS = b"421 4.3.2 Too many connections, try again later\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


class _Protocol(SMTP):
    """aiosmtpd's SMTP session with our limits and reply texts."""

    # Real mail breaks the 998-octet line limit; refusing it would lose mail that
    # every mainstream MTA accepts. The size limit still bounds memory.
    line_length_limit = 128 * 1024

    def __init__(self, adapter: SmtpAdapter, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(adapter.handler, **kwargs)
        self._adapter = adapter
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self._adapter.sessions) >= self._adapter.settings.max_sessions:
            self._refused = True
            REJECTED.labels("smtp", "too-many-sessions").inc()
            transport.write(TOO_MANY_SESSIONS)  # type: ignore[attr-defined]
            transport.close()
            log.warning("smtp session refused: too many connections")
            return
        self._adapter.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._adapter.sessions.discard(self)
        super().connection_lost(error)

    async def smtp_MAIL(self, arg: str | None) -> None:
        # A transaction that starts after shutdown began would have nowhere to go.
        if self._adapter.closing:
            self.goodbye()
            return
        await super().smtp_MAIL(arg)

    def goodbye(self) -> None:
        """421 and close: the client retries later, as RFC 5321 section 3.8 asks."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(SHUTTING_DOWN)  # type: ignore[attr-defined]
            self.transport.close()

    async def push(self, status: Any) -> None:  # noqa: ANN401 - aiosmtpd's AnyStr
        if isinstance(status, str):
            status = _REWRITES.get(status, status)
            if status.startswith("552 5.3.4"):
                REJECTED.labels("smtp", "size").inc()
        await super().push(status)


class SmtpHandler:
    """aiosmtpd hooks: recipient policy at RCPT, the durable hand-off at DATA."""

    def __init__(self, adapter: SmtpAdapter) -> None:
        self._adapter = adapter

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        settings = self._adapter.settings
        if len(envelope.rcpt_tos) >= settings.max_recipients:
            REJECTED.labels("smtp", "too-many-recipients").inc()
            return "452 4.5.3 Too many recipients"
        try:
            canonical = canonical_email(address, self._adapter.email_policy)
        except IdentityError:
            REJECTED.labels("smtp", "bad-address").inc()
            return f"553 5.1.3 <{address}>: bad recipient address syntax"
        if not self._adapter.accepts(canonical):
            REJECTED.labels("smtp", "relay").inc()
            return (
                f"550 5.1.1 <{address}>: recipient not accepted here "
                "(not a local domain; this server does not relay)"
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        RECEIVED.labels("smtp").inc()
        try:
            return await self._adapter.receive(session, envelope)
        except RetryLater:
            REJECTED.labels("smtp", "retry-later").inc()
            return "451 4.3.0 Temporarily unable to accept the message; please try again later"
        except Rejected as exc:
            REJECTED.labels("smtp", exc.reason).inc()
            return f"554 5.6.0 Message refused: {exc.detail}"[:500]
        except Stop as exc:
            REJECTED.labels("smtp", "stopping").inc()
            self._adapter.context.on_stop(f"smtp: {exc}")
            return "421 4.3.2 Service shutting down, try again later"
        except Exception:
            log.exception("smtp hand-off failed unexpectedly")
            REJECTED.labels("smtp", "retry-later").inc()
            return "451 4.3.0 Temporary local error; please try again later"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp session error", extra={"error": repr(error)})
        return "451 4.3.0 Temporary local error; please try again later"


class SmtpAdapter(Adapter[SmtpSettings]):
    """The SMTP channel: ``start`` listens, ``stop`` stops accepting and drains."""

    name = "smtp"
    summary = "SMTP server: email delivered by MTAs, answered after the hand-off"
    settings_class = SmtpSettings
    config_section = "smtp"
    role = "smtp"

    @classmethod
    def settings_from(cls, settings: Settings) -> SmtpSettings:
        return settings.smtp

    @classmethod
    def configured_in(cls, settings: Settings) -> bool:
        return settings.smtp.enabled

    def __init__(self, settings: SmtpSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        self.host = context.bind_host
        self.port = settings.port
        email_policy = self.email_policy = context.email_policy
        self.handler = SmtpHandler(self)
        self.sessions: set[_Protocol] = set()
        self._domains = set(settings.domains)
        self._addresses: set[str] = set()
        for address in settings.addresses:
            try:
                self._addresses.add(canonical_email(address, email_policy))
            except IdentityError as exc:
                raise StartupError(f"smtp.addresses: {exc}") from exc
        self._parsers = ParserPool(settings.parse_workers)
        self._server: asyncio.Server | None = None
        self._in_flight = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def accepts(self, canonical: str) -> bool:
        return canonical in self._addresses or canonical.rsplit("@", 1)[1] in self._domains

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.settings.tls_cert is None or self.settings.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"smtp: cannot load TLS certificate/key: {exc}") from exc
        return context

    async def start(self) -> None:
        if not self._domains and not self._addresses:
            log.warning(
                "no SMTP domains or addresses configured: every recipient will be refused "
                "(set SWITCHBOARD_SMTP_DOMAINS)"
            )
        tls = self._tls_context()
        await asyncio.to_thread(self._parsers.start)
        hostname = self.settings.hostname or await asyncio.to_thread(socket.getfqdn)
        loop = asyncio.get_running_loop()

        def factory() -> _Protocol:
            return _Protocol(
                self,
                data_size_limit=self.settings.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=hostname,
                ident="Switchboard ESMTP",
                tls_context=tls,
                require_starttls=self.settings.require_tls,
                timeout=self.settings.timeout_s,
                loop=loop,
            )

        try:
            self._server = await loop.create_server(factory, self.host, self.port, backlog=512)
        except OSError as exc:
            raise StartupError(
                f"SMTP server could not listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "smtp listening",
            extra={"address": f"{self.host}:{self.port}", "starttls": tls is not None},
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self.closing = True
        self._server.close()  # stop accepting new connections
        try:
            await asyncio.wait_for(self._idle.wait(), 5)  # let hand-offs in flight finish
        except TimeoutError:
            log.warning(
                "smtp hand-offs still in flight at shutdown", extra={"count": self._in_flight}
            )
        for session in list(self.sessions):
            session.goodbye()
        self._server = None
        await asyncio.to_thread(self._parsers.stop)

    async def receive(self, session: Session, envelope: Envelope) -> str:
        """Normalize, make durable, and return the reply line for DATA."""
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._receive(session, envelope)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _receive(self, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message_id = uuid6.uuid7()
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        ctx = EmailContext(
            adapter=self.name,
            message_id=message_id,
            received_at=datetime.now(UTC),
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            email_policy=self.email_policy,
            metadata={
                "peer": peer,
                "helo": session.host_name,
                "tls": session.ssl is not None,
                "smtputf8": bool(envelope.smtp_utf8),
            },
        )
        try:
            # Parsing is CPU work (about 1 ms for a 2 KB message): off the event loop.
            normalized = await self._parsers.run(normalize_email, raw, ctx)
        except NormalizeError as exc:
            return await self._dead_letter(message_id, raw, exc.reason, exc.detail, ctx)
        except Exception as exc:  # a normalizer bug must not lose the mail
            log.exception("email normalizer failed", extra={"message_id": str(message_id)})
            return await self._dead_letter(
                message_id, raw, "normalizer-error", f"{type(exc).__name__}: {exc}", ctx
            )
        await self.handoff.deliver(normalized)
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _dead_letter(
        self, message_id: UUID, raw: bytes, reason: str, detail: str, ctx: EmailContext
    ) -> str:
        await self.handoff.dead_letter(
            id=message_id,
            adapter=self.name,
            reason=reason,
            detail=detail,
            raw=Blob.of(raw, "message/rfc822"),
            metadata={
                "mail_from": ctx.mail_from,
                "rcpt_tos": list(ctx.rcpt_tos),
                **ctx.metadata,
            },
        )
        return f"250 2.0.0 Ok: queued as {message_id} (kept for review: {reason})"
