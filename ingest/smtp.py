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
import re
import socket
import ssl
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any
from uuid import UUID

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from ingest.errors import Rejected, RetryLater, Stop
from ingest.mailauth import Envelope as AuthEnvelope
from ingest.mailauth import Resolver, Verifier, in_networks, judge_authserv
from ingest.sdk import Adapter, AdapterContext, AdapterTables
from ingest.settings import SmtpSettings
from ingest.smtpdata import MessageData, read_message
from ingest.workers import ParserPool
from normalize.content import Blob
from normalize.email import EmailContext, EmailVerdict, serialize_email
from normalize.errors import NormalizeError
from normalize.identity import IdentityError, canonical_email
from normalize.schema import AuthCheck, Authentication
from switchboard.errors import StartupError
from switchboard.ids import uuid7
from switchboard.metrics import RECEIVED, REJECTED, SENDER_CHECKS, child

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
TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from your address, try again later\r\n"
TOO_MUCH_JUNK = b"421 4.7.0 Too many commands without a message, closing connection\r\n"
DEADLINE_REACHED = b"421 4.4.2 Session time limit exceeded, closing connection\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
STORAGE_FULL = "452 4.3.1 Insufficient system storage, try again later"
#: aiosmtpd's reply to STARTTLS, after which it starts the TLS layer.
_TLS_READY = "220 Ready to start TLS"

#: The commands of a mail transaction. Everything else (NOOP, RSET, VRFY, EXPN,
#: HELP and unknown verbs) is a "junk" command as Postfix counts them: a client
#: may send a few, but a session made of them only holds a slot and the loop.
TRANSACTION_COMMANDS = frozenset(
    {"HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"}
)

#: After a 421 the client should close; one that does not read (so the reply
#: cannot be flushed and the socket never closes) is cut off after this.
_HANG_UP_GRACE_S = 5.0

#: Threads for the sender checks: they mostly wait for DNS answers, so a few more
#: than the cores keep one slow domain from holding up everyone else's mail.
_AUTH_THREADS = 8


_DISPATCH_NAMES: dict[type, list[str]] = {}

#: ``<local@domain>`` with a dot-atom on each side in ASCII, and what follows: the
#: address of nearly every MAIL FROM and RCPT TO, which needs no full RFC 5322 parse
#: (unless it holds "=?": see _Protocol._getaddr).
_PLAIN_ANGLE_ADDR = re.compile(
    r"<(({a}+(?:\.{a}+)*)@{a}+(?:\.{a}+)*)>".format(a=r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]")
)


def _dispatch_dir(obj: object, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of ``obj``'s class that start with ``prefixes``, listed once
    per class, for ``__dir__``. aiosmtpd's session finds its verbs, AUTH mechanisms and
    handler hooks on every new connection with ``dir()`` and ``inspect.getmembers()``,
    which read every attribute, properties included: 18% of the SMTP edge's GIL
    samples in the end-to-end bench, where each mail has a connection of its own
    (py-spy, 2026-11-30); a session then took 87 us to set up, 18 us with this.
    ``tests/unit/test_smtp_session.py`` checks that the dispatch tables come out the
    same as with the full listing. Listed from the class: a verb added to the class
    after its first session (a monkeypatch) is not seen."""
    cls = type(obj)
    names = _DISPATCH_NAMES.get(cls)
    if names is None:
        names = _DISPATCH_NAMES[cls] = [n for n in dir(cls) if n.startswith(prefixes)]
    return names


class _Dispatch(dict[str, Any]):
    """aiosmtpd's command table, counting junk commands as the session looks them up.

    aiosmtpd has no hook between reading a command and running it, but it looks
    every command (known or not) up in ``_smtp_methods`` exactly there; counting
    at that point covers unknown verbs too, which no ``smtp_*`` override sees.
    """

    def __init__(self, methods: dict[str, Any], session: _Protocol) -> None:
        super().__init__(methods)
        self._session = session

    def get(self, command: str, default: Any = None) -> Any:  # noqa: ANN401 - aiosmtpd's table
        session = self._session
        if session.hung_up:
            return session.ignore_command
        if command not in TRANSACTION_COMMANDS:
            session.junk += 1
            if session.junk > session.junk_limit:
                return session.refuse_junk
        return super().get(command, default)


def _echo(address: str) -> str:
    """A client's address as a reply may quote it: ASCII, escaped past that, at most
    256 characters. Invalid UTF-8 arrives as surrogate escapes, and the reply that
    quoted it could not be encoded: a 451 (retry) instead of the 553 (attacker review,
    2026-12-02)."""
    return address[:256].encode("ascii", "backslashreplace").decode("ascii")


class _Protocol(SMTP):
    """aiosmtpd's SMTP session with our limits and reply texts."""

    # Real mail breaks the 998-octet line limit; refusing it would lose mail that
    # every mainstream MTA accepts. The size limit still bounds memory.
    line_length_limit = 128 * 1024

    def __init__(self, adapter: SmtpAdapter, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(adapter.handler, **kwargs)
        self._adapter = adapter
        self._refused = False
        self._client: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.junk = 0
        self.junk_limit = adapter.settings.junk_command_limit
        self.hung_up = False
        self.handing_off = False
        self.deadline_passed = False
        self._reserved = 0  # bytes of message data this session holds room for
        self._smtp_methods = _Dispatch(self._smtp_methods, self)

    def __dir__(self) -> list[str]:
        """Only the ``smtp_*`` verbs and ``auth_*`` mechanisms (see :func:`_dispatch_dir`)."""
        return _dispatch_dir(self, ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address of MAIL FROM / RCPT TO and the rest (its parameters): the
        same parse as aiosmtpd's own, which defines a ``typing.Protocol`` class on
        every call for its type checker: that took 13% of the SMTP process's GIL
        samples under load, 6.6% with this (py-spy, 2026-11-29; throughput did not
        change measurably: the process is not the bottleneck). A test compares the
        two parses."""
        if not arg:
            return "", ""
        plain = _PLAIN_ANGLE_ADDR.match(arg)
        # "=?" may start an RFC 2047 encoded word, which the full parse decodes.
        if plain is not None and "=?" not in plain[1]:
            # The same answer as the full parse below, in 0.6 us instead of 23. That
            # parse also drops the folding white space after ">" (all of what
            # str.lstrip drops, once it starts with a space or a tab) and comments,
            # which are left to it.
            after = arg[plain.end() :]
            if after[:1] in (" ", "\t"):
                after = after.lstrip()
            if not after.startswith("("):
                if self.local_part_limit and len(plain[2]) > self.local_part_limit:
                    return None, None
                return plain[1], after
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                addr: str = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                addr = spec.addr_spec
        except HeaderParseError:
            return None, None
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self in self._adapter.sessions:
            # STARTTLS calls this again with the TLS transport: already admitted.
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refusal = self._adapter.admit(client)
        if refusal is not None:
            self._refused = True
            transport.write(refusal)  # type: ignore[attr-defined]
            transport.close()
            return
        self._client = client
        self._adapter.sessions.add(self)
        super().connection_made(transport)
        # The idle timeout restarts with every command; this one does not, so a
        # client trickling commands cannot hold a connection slot for ever.
        self._deadline = self.loop.call_later(
            self._adapter.settings.session_deadline_s, self._deadline_reached
        )

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        if self in self._adapter.sessions:
            self._adapter.sessions.discard(self)
            self._adapter.release(self._client)
        super().connection_lost(error)

    def _deadline_reached(self) -> None:
        if self.handing_off:
            # The mail may already be durable: let the sender see its 250 first,
            # else it would send the message again.
            self.deadline_passed = True
            return
        REJECTED.labels("smtp", "session-deadline").inc()
        log.warning("smtp session deadline reached", extra={"peer": self._client})
        self.hang_up(DEADLINE_REACHED)

    def hang_up(self, reply: bytes) -> None:
        """Send a 421 and close; abort if the client does not let it be delivered."""
        self.hung_up = True
        transport = self.transport
        if transport is None or transport.is_closing():
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
            return
        transport.write(reply)  # type: ignore[attr-defined]
        transport.close()
        self.loop.call_later(_HANG_UP_GRACE_S, transport.abort)  # type: ignore[attr-defined]
        # Commands the client pipelined are still in the read buffer, and reading
        # them never waits: stop the session's task rather than let it spin
        # through them all without giving the loop back.
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def refuse_junk(self, arg: str | None) -> None:
        REJECTED.labels("smtp", "junk-commands").inc()
        log.warning(
            "smtp session closed: too many junk commands",
            extra={"peer": self._client, "limit": self.junk_limit},
        )
        self.hang_up(TOO_MUCH_JUNK)

    async def ignore_command(self, arg: str | None) -> None:
        """What pipelined commands still in the buffer get after the 421: nothing.

        It waits for the cancellation ``hang_up`` requested, which only lands at
        a real suspension point.
        """
        await self.loop.create_future()

    async def smtp_MAIL(self, arg: str | None) -> None:
        # A transaction that starts after shutdown began would have nowhere to go.
        if self._adapter.closing:
            self.goodbye()
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read by our own loop rather than aiosmtpd's.

        aiosmtpd keeps one bytearray per line until the final dot (about 90 bytes
        for a 2-byte line: 40 times what the size limit counts) and holds the message
        until its reply is written. Here the body is one buffer, dot-unstuffed as it
        arrives, charged to the adapter's ``max_data_in_flight`` budget as it grows,
        and dropped before the reply goes out. Otherwise as aiosmtpd: the size limit
        counts the bytes on the wire, a line over the reader's limit is ``500``, too
        much data is ``552``, each after the final dot (RFC 5321 section 4.2.5)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if self.envelope is None or not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        first = self._data_reservation()
        if not self._adapter.reserve_data(first, self._client, own=0):
            await self.push(STORAGE_FULL)
            return
        self._reserved = first
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            status = await self._receive_data()
        finally:
            # Before the reply: a sender told 250 may start its next DATA at once.
            self._release_data()  # the data is gone by now, however this ended
        if status is not None:
            await self.push(status)
        if self.deadline_passed and not self.hung_up:
            self.deadline_passed = False
            self._deadline_reached()

    async def _receive_data(self) -> str | None:
        """Read the message to its final dot (in runs of lines: ingest/smtpdata.py) and
        hand it off; the reply to send, or None when the connection went away first."""

        def room(needed: int) -> bool:
            return needed <= self._reserved or self._grow(needed)

        data = MessageData(
            size_limit=self.data_size_limit,
            line_limit=self.line_length_limit,
            room=room,
            full=STORAGE_FULL,
        )
        try:
            ended = await read_message(self._reader, data, lambda: self.transport is not None)
        except asyncio.CancelledError:
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        if not ended:
            return None
        if data.failed is not None or self.envelope is None:
            self._clear_envelope()
            return data.failed
        self.envelope.original_content = self.envelope.content = bytes(data.body)
        del data
        status = await self._call_handler_hook("DATA")
        self._clear_envelope()  # the message is dropped before the reply
        return "250 OK" if status is MISSING else str(status)

    def _clear_envelope(self) -> None:
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd's, untyped

    def _grow(self, needed: int) -> bool:
        """More room for a message larger than its reservation (a declared SIZE
        is a hint, not a promise), in steps of at least its size so far."""
        more = max(needed - self._reserved, self._reserved, 64 * 1024)
        if not self._adapter.reserve_data(more, self._client, own=self._reserved):
            return False
        self._reserved += more
        return True

    def _release_data(self) -> None:
        reserved, self._reserved = self._reserved, 0
        if reserved:
            self._adapter.release_data(reserved, self._client)

    def _data_reservation(self) -> int:
        """The room a message starts with: its declared SIZE (RFC 1870) with a tenth
        and 64 KiB to spare, at most 1 MiB; it grows as the data comes (see _grow).

        Not the whole declared SIZE: a SIZE is a stranger's word, and 41 sessions
        from 5 addresses declaring 25 MiB each and sending nothing after DATA held
        the whole 1 GiB budget, every other sender answered 452 for as long as they
        stayed (attacker review, 2026-12-02). Room is now taken for bytes received."""
        start = 1024 * 1024
        for option in self.envelope.mail_options if self.envelope is not None else ():
            name, _, value = option.partition("=")
            if name.upper() == "SIZE" and value.isascii() and value.isdigit():
                declared = int(value)
                start = min(start, declared + declared // 10 + 64 * 1024)
        return min(self._adapter.settings.max_message_size, start)

    def goodbye(self) -> None:
        """421 and close: the client retries later, as RFC 5321 section 3.8 asks."""
        if self.transport is not None and not self.transport.is_closing():
            self.hang_up(SHUTTING_DOWN)

    async def push(self, status: Any) -> None:  # noqa: ANN401 - aiosmtpd's AnyStr
        if self.hung_up:
            return
        if isinstance(status, str):
            status = _REWRITES.get(status, status)
            if status.startswith("552 5.3.4"):
                REJECTED.labels("smtp", "size").inc()
        await super().push(status)
        if status == _TLS_READY:
            # aiosmtpd puts the TLS layer on the connection right after this reply.
            # A loop turn here would let the client's ClientHello, sent as soon as it
            # reads the 220, reach the SMTP reader instead, and the handshake would
            # wait for it forever (test_starttls[uvloop] timed out so once in CI
            # under load, 2026-12-02).
            return
        # With pipelined commands in its buffer, aiosmtpd reads and answers without
        # ever awaiting anything that blocks: one client would hold the event loop
        # (and every other session and the HTTP server on it) until its buffer is
        # empty. One loop turn per reply keeps the others served.
        await asyncio.sleep(0)


class SmtpHandler:
    """aiosmtpd hooks: recipient policy at RCPT, the durable hand-off at DATA."""

    def __init__(self, adapter: SmtpAdapter) -> None:
        self._adapter = adapter

    def __dir__(self) -> list[str]:
        """Only the ``handle_*`` hooks and ``auth_*`` mechanisms (see :func:`_dispatch_dir`)."""
        return _dispatch_dir(self, ("handle_", "auth_"))

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
            return f"553 5.1.3 <{_echo(address)}>: bad recipient address syntax"
        if not self._adapter.accepts(canonical):
            REJECTED.labels("smtp", "relay").inc()
            return (
                f"550 5.1.1 <{_echo(address)}>: recipient not accepted here "
                "(not a local domain; this server does not relay)"
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        child(RECEIVED, "smtp").inc()
        if isinstance(server, _Protocol):
            server.handing_off = True
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
        finally:
            if isinstance(server, _Protocol):
                server.handing_off = False

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp session error", extra={"error": repr(error)})
        return "451 4.3.0 Temporary local error; please try again later"


class SmtpAdapter(Adapter[SmtpSettings]):
    """The SMTP channel: ``start`` listens, ``stop`` stops accepting and drains."""

    name = "smtp"
    summary = "SMTP server: email delivered by MTAs, answered after the hand-off"
    settings_class = SmtpSettings
    role = "smtp"

    @classmethod
    def configured_in(cls, settings: AdapterTables) -> bool:
        return cls.settings_from(settings).enabled  # on unless switched off

    def __init__(self, settings: SmtpSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        self.host = context.bind_host
        self.port = settings.port
        email_policy = self.email_policy = context.email_policy
        self.handler = SmtpHandler(self)
        self.sessions: set[_Protocol] = set()
        self._per_client: Counter[str] = Counter()
        # Each worker of a fleet sharing the port takes its part of the limits.
        self._max_sessions = context.share(settings.max_sessions)
        self._max_per_client = context.share(settings.max_sessions_per_client)
        self._data_budget = context.share(settings.max_data_in_flight)
        self._data_reserved = 0
        self._data_per_client: Counter[str] = Counter()
        self._domains = set(settings.domains)
        self._addresses: set[str] = set()
        for address in settings.addresses:
            try:
                self._addresses.add(canonical_email(address, email_policy))
            except IdentityError as exc:
                raise StartupError(f"smtp.addresses: {exc}") from exc
        self._parsers = ParserPool(
            settings.parse_workers, settings.parse_timeout_s, settings.parse_memory_mb
        )
        self._verifier: Verifier | None = None
        if settings.verify:
            try:
                resolver = Resolver(
                    settings.dns_servers, settings.dns_timeout_s, settings.dns_cache_size
                )
            except ValueError as exc:
                raise StartupError(f"smtp.dns_servers: {exc} (an IP address, ip:port)") from exc
            self._verifier = Verifier(
                resolver, settings.verify_timeout_s, settings.trusted_arc_sealers
            )
        self._auth_pool: ThreadPoolExecutor | None = None
        self._server: asyncio.Server | None = None
        self._in_flight = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, client: str) -> bytes | None:
        """None if a new session from ``client`` may start, else the 421 to send."""
        if len(self.sessions) >= self._max_sessions:
            REJECTED.labels("smtp", "too-many-sessions").inc()
            log.warning("smtp session refused: too many connections")
            return TOO_MANY_SESSIONS
        if self._per_client[client] >= self._max_per_client:
            # Like Postfix's smtpd_client_connection_count_limit: one address
            # cannot take every slot and lock every other sender out.
            REJECTED.labels("smtp", "too-many-sessions-from-client").inc()
            log.warning(
                "smtp session refused: too many connections from one client",
                extra={"peer": client, "limit": self._max_per_client},
            )
            return TOO_MANY_FROM_CLIENT
        self._per_client[client] += 1
        return None

    def reserve_data(self, size: int, client: str | None = None, own: int = 0) -> bool:
        """Room for one message's data, or False (452) when the sessions already
        hold the budget, or when ``client``'s sessions would hold more than a quarter
        of it (as the HTTP body budget: a few addresses cannot take it all). One
        message always fits when nothing else is held, and a client's message when
        its other sessions hold nothing: ``own`` is what this message already holds
        (its room grows by doubling, and counting its own steps against the quarter
        refused a 17 MB mail from an idle client with nine workers: review,
        2026-12-02)."""
        held = self._data_per_client[client] if client is not None else 0
        over_all = self._data_reserved and self._data_reserved + size > self._data_budget
        over_client = held - own > 0 and held + size > self._data_budget // 4
        if over_all or over_client:
            REJECTED.labels("smtp", "insufficient-storage").inc()
            log.warning(
                "smtp DATA refused: message data in memory at its limit",
                extra={
                    "reserved": self._data_reserved,
                    "limit": self._data_budget,
                    "client": client,
                    "client_reserved": held,
                },
            )
            return False
        self._data_reserved += size
        if client is not None:
            self._data_per_client[client] += size
        return True

    def release_data(self, size: int, client: str | None = None) -> None:
        self._data_reserved -= size
        if client is not None:
            self._data_per_client[client] -= size
            if self._data_per_client[client] <= 0:
                del self._data_per_client[client]

    def release(self, client: str | None) -> None:
        if client is None:
            return
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

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
        if self._verifier is not None or self.settings.trusted_authserv_ids:
            self._auth_pool = ThreadPoolExecutor(_AUTH_THREADS, thread_name_prefix="smtp-auth")
        # The parse process imports the email normalizer while starting, not within
        # the first mail's time limit.
        self._parsers.preload(serialize_email.__module__)
        await self._parsers.warm_up()
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
            inherited = self.context.sockets.get("smtp")
            if inherited is not None:
                self._server = await loop.create_server(factory, sock=inherited, backlog=512)
            else:
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
        await self._parsers.stop()
        if self._auth_pool is not None:
            self._auth_pool.shutdown(wait=False, cancel_futures=True)
            self._auth_pool = None

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
        message_id = uuid7()
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        verdict = await self._authenticate(
            raw, AuthEnvelope(peer, session.host_name, envelope.mail_from or "")
        )
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
            verdict=verdict,
        )
        try:
            # Parsing is CPU work (about 1 ms for a 2 KB message): off the event loop.
            # Serialized there: the model never crosses back (see normalize.content.Serialized).
            normalized = (await self._parsers.run(serialize_email, raw, ctx)).restoring(raw)
        except NormalizeError as exc:
            return await self._dead_letter(message_id, raw, exc.reason, exc.detail, ctx)
        except RetryLater:
            raise  # no parse process could be started: 451, the sender tries again
        except Exception as exc:  # a normalizer bug must not lose the mail
            log.exception("email normalizer failed", extra={"message_id": str(message_id)})
            return await self._dead_letter(
                message_id, raw, "normalizer-error", f"{type(exc).__name__}: {exc}", ctx
            )
        await self.handoff.deliver(normalized)
        return f"250 2.0.0 Ok: queued as {message_id}"

    def _judge(self, raw: bytes, envelope: AuthEnvelope) -> EmailVerdict | None:
        """A trusted relay's header when there is one, else the local checks.

        The header counts only from a listed relay: any client can write an
        Authentication-Results header naming any authserv-id.
        """
        trusted = self.settings.trusted_authserv_ids
        if trusted and in_networks(envelope.peer, self.settings.trusted_relays):
            verdict = judge_authserv(raw, trusted)
            if verdict is not None:
                return verdict
        return self._verifier.verify(raw, envelope) if self._verifier is not None else None

    async def _authenticate(self, raw: bytes, envelope: AuthEnvelope) -> EmailVerdict | None:
        """The sender verdict, within verify_timeout_s; never an exception, never a refusal."""
        verdict = await self._verdict(raw, envelope)
        auth = verdict.authentication if verdict is not None else None
        dmarc = (
            next((c.result for c in auth.checks if c.method == "dmarc"), "absent")
            if auth
            else "absent"
        )
        source = auth.source.split(":", 1)[0] if auth is not None else "none"
        SENDER_CHECKS.labels(source, dmarc).inc()
        return verdict

    async def _verdict(self, raw: bytes, envelope: AuthEnvelope) -> EmailVerdict | None:
        if self._auth_pool is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._auth_pool, self._judge, raw, envelope),
                self.settings.verify_timeout_s + 1.0,
            )
        except TimeoutError:
            detail = "sender checks took longer than verify_timeout_s"
        except Exception as exc:  # a check's bug must not cost the mail
            log.exception("smtp sender checks failed")
            detail = f"sender checks failed: {type(exc).__name__}"
        check = AuthCheck(method="dmarc", result="temperror", detail=detail)
        return EmailVerdict(Authentication(source="local", checks=(check,)))

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
