"""The IMAP adapter: polls mailboxes that cannot point an MX at Switchboard.

It never relies on ``\\Seen`` (someone reading the mail elsewhere must not hide
it) and never fetches by sequence number: progress is ``UIDVALIDITY`` + the last
ingested UID per folder, stored in the database and advanced only after Kafka
acknowledged the message. Messages are fetched with ``BODY.PEEK[]`` so flags do
not change. One poller thread per mailbox; a broken mailbox never stops the
others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import imaplib
import ipaddress
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from ingest.errors import RetryLater, Stop
from ingest.handoff import HandOff
from ingest.imap_state import ImapStateStore
from ingest.mailauth import judge_authserv
from ingest.sdk import Adapter, AdapterContext, AdapterTables
from ingest.settings import ImapSettings, MailboxSettings
from ingest.workers import ParserPool
from normalize.content import Blob
from normalize.email import EmailContext, serialize_email
from normalize.errors import NormalizeError
from normalize.identity import EmailPolicy
from switchboard.ids import uuid7
from switchboard.metrics import IMAP_CONNECTED, IMAP_LAST_SUCCESS, IMAP_LAST_UID, RECEIVED

log = logging.getLogger(__name__)

T = TypeVar("T")
_NETWORK_ERRORS = (IMAPClientError, imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError, ssl.SSLError)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def first_search(backfill: str, today: date) -> list[object] | None:
    """IMAP SEARCH criteria for a folder seen for the first time (None: skip old mail)."""
    if backfill == "none":
        return None
    if backfill == "all":
        return ["ALL"]
    match = re.fullmatch(r"(\d+)d", backfill)
    since = today - timedelta(days=int(match.group(1))) if match else date.fromisoformat(backfill)
    return ["SINCE", since]


class MailboxPoller(threading.Thread):
    """Keeps one mailbox ingested: connect, catch up every folder, wait, repeat."""

    def __init__(
        self,
        mailbox: MailboxSettings,
        settings: ImapSettings,
        handoff: HandOff,
        store: ImapStateStore,
        *,
        loop: asyncio.AbstractEventLoop,
        parsers: ParserPool | None = None,
        email_policy: EmailPolicy | None = None,
        on_stop: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"imap-{mailbox.name}", daemon=True)
        self.parsers = parsers or ParserPool(0)
        self.on_stop = on_stop
        self.mailbox = mailbox
        self.settings = settings
        self.handoff = handoff
        self.store = store
        self.loop = loop
        self.email_policy = email_policy
        self.stopping = threading.Event()
        self.address = mailbox.address or (mailbox.username if "@" in mailbox.username else None)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                client = self._connect()
            except LoginError as exc:
                self._failed(f"login failed for user {self.mailbox.username!r}: {exc}", backoff)
            except _NETWORK_ERRORS as exc:
                self._failed(f"cannot connect to {self._where()}: {_describe(exc)}", backoff)
            else:
                backoff = 1.0
                try:
                    self._status(connected=True)
                    self._serve(client)
                except RetryLater as exc:
                    self._failed(f"hand-off not durable: {exc.detail}", backoff)
                except Stop as exc:  # nothing more can be ingested: the process stops
                    log.error(
                        "imap mailbox %s cannot go on: %s; stopping",
                        self.mailbox.name,
                        exc,
                        extra={"mailbox": self.mailbox.name},
                    )
                    self._status(connected=False, error=f"stopped: {exc}")
                    self.stopping.set()
                    if self.on_stop is not None:
                        self.on_stop(f"imap {self.mailbox.name}: {exc}")
                except _NETWORK_ERRORS as exc:
                    self._failed(f"connection to {self._where()} lost: {_describe(exc)}", backoff)
                except Exception as exc:
                    log.exception("imap poller failed", extra={"mailbox": self.mailbox.name})
                    self._failed(f"unexpected error: {_describe(exc)}", backoff)
                finally:
                    _close(client)
            if not self.stopping.is_set():
                self.stopping.wait(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                backoff = min(backoff * 2, self.settings.backoff_max_s)
        self._status(connected=False)

    def _failed(self, message: str, backoff: float) -> None:
        # Once per backoff step, with the mailbox name, never the password.
        log.error(
            "imap mailbox %s: %s; retrying in about %.0fs",
            self.mailbox.name,
            message,
            backoff,
            extra={"mailbox": self.mailbox.name},
        )
        self._status(connected=False, error=message)

    def _status(
        self, *, connected: bool, error: str | None = None, success: bool = False, ingested: int = 0
    ) -> None:
        name = self.mailbox.name
        IMAP_CONNECTED.labels(name).set(int(connected))
        if success:
            IMAP_LAST_SUCCESS.labels(name).set_to_current_time()
        self.store.set_status(
            name, connected=connected, error=error, success=success, ingested=ingested
        )

    def _where(self) -> str:
        return f"{self.mailbox.host}:{self.mailbox.resolved_port()}"

    def _connect(self) -> IMAPClient:
        box = self.mailbox
        context = ssl.create_default_context(cafile=str(box.ca_file) if box.ca_file else None)
        client = IMAPClient(
            box.host,
            port=box.resolved_port(),
            ssl=box.security == "tls",
            ssl_context=context,
            timeout=self.settings.timeout_s,
        )
        try:
            if box.security == "starttls":
                client.starttls(context)
            elif box.security == "none" and not _is_loopback(box.host):
                log.warning("imap mailbox %s: logging in without TLS", box.name)
            # Resolved from password_env when the settings were loaded.
            password = box.password.get_secret_value() if box.password else ""
            client.login(box.username, password)
        except BaseException:
            _close(client)
            raise
        return client

    def _serve(self, client: IMAPClient) -> None:
        idle = len(self.mailbox.folders) == 1 and b"IDLE" in client.capabilities()
        while not self.stopping.is_set():
            for folder in self.mailbox.folders:
                self._sync(client, folder)
            self._status(connected=True, success=True)
            if idle:
                self._idle(client)
            else:
                client.noop()
                self.stopping.wait(self.settings.poll_interval_s)

    def _idle(self, client: IMAPClient) -> None:
        """Wait for new mail with IDLE, renewed before the server's 29-minute limit
        and at least every ``idle_resync_s``: mail that arrived between the last
        search and the start of IDLE is not announced by every server (measured on
        Dovecot 2.3: not until its own check, 30 s later), so the folder is searched
        again that often whatever IDLE says."""
        client.idle()
        started = time.monotonic()
        longest = min(self.settings.idle_renew_s, self.settings.idle_resync_s)
        try:
            while not self.stopping.is_set():
                if time.monotonic() - started > longest:
                    return
                if client.idle_check(timeout=1):  # 1 s steps, to notice a stop
                    return
        finally:
            client.idle_done()

    # -- one folder ----------------------------------------------------------------

    def _sync(self, client: IMAPClient, folder: str) -> None:
        box = self.mailbox
        writable = bool(box.mark_keyword or box.move_to)
        info = client.select_folder(folder, readonly=not writable)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = int(info.get(b"UIDNEXT", 0))
        checkpoint = self.store.checkpoint(box.name, folder)
        if checkpoint is None:
            criteria = first_search(box.backfill, datetime.now(UTC).date())
            floor = 0
            if criteria is None:
                self.store.advance(box.name, folder, uidvalidity, max(uidnext - 1, 0))
                log.info("imap %s/%s: no backfill; new mail from UID %d", box.name, folder, uidnext)
                return
        elif checkpoint.uidvalidity != uidvalidity:
            since = (checkpoint.updated_at - timedelta(days=1)).date()
            log.warning(
                "imap %s/%s: UIDVALIDITY changed from %d to %d; re-scanning mail since %s "
                "(the router drops what was already ingested by Message-ID)",
                box.name,
                folder,
                checkpoint.uidvalidity,
                uidvalidity,
                since,
                extra={"mailbox": box.name, "folder": folder},
            )
            criteria, floor = ["SINCE", since], 0
        else:
            criteria, floor = ["UID", f"{checkpoint.last_uid + 1}:*"], checkpoint.last_uid
        uids = sorted(uid for uid in client.search(criteria) if uid > floor)
        for batch in self._batches(client, uids):
            fetched = client.fetch([u for u, size in batch if size is not None], ["BODY.PEEK[]"])
            done = 0
            try:
                for uid, size in batch:
                    if self.stopping.is_set():
                        return
                    if size is None:
                        self._too_large(folder, uid, uidvalidity)
                        self._after(client, uid)
                    else:
                        data = fetched.get(uid)
                        raw = data.get(b"BODY[]") if data else None
                        if isinstance(raw, bytes):
                            self._ingest(raw, folder, uid, uidvalidity)
                            self._after(client, uid)
                    # The checkpoint is what durability rests on: one per message.
                    self.store.advance(box.name, folder, uidvalidity, uid)
                    IMAP_LAST_UID.labels(box.name).set(uid)
                    done += 1
            finally:
                # The counter is for people: once per batch, also when it broke off.
                if done:
                    self._status(connected=True, ingested=done)
        # Everything below UIDNEXT at SELECT was considered: older mail outside the
        # window is skipped on purpose, newer mail comes next round.
        self.store.advance(box.name, folder, uidvalidity, max(uidnext - 1, 0))

    def _batches(
        self, client: IMAPClient, uids: list[int]
    ) -> Iterator[list[tuple[int, int | None]]]:
        """The UIDs in fetch batches of at most ``batch_size`` messages and
        ``max_fetch_bytes``, each with its size, or None when it is over
        ``max_message_size`` (not to be downloaded). The sizes are asked first: a
        100 MiB mail fetched with its 49 neighbours grew the poller by 855 MiB
        (attacker review, 2026-11-30)."""
        limit, budget = self.settings.max_message_size, self.settings.max_fetch_bytes
        for chunk in _chunks(uids, self.settings.batch_size):
            sizes = client.fetch(chunk, ["RFC822.SIZE"])
            batch: list[tuple[int, int | None]] = []
            used = 0
            for uid in chunk:
                size = int((sizes.get(uid) or {}).get(b"RFC822.SIZE", 0))
                if size > limit:
                    batch.append((uid, None))
                    continue
                if batch and used + size > budget:
                    yield batch
                    batch, used = [], 0
                batch.append((uid, size))
                used += size
            if batch:
                yield batch

    def _too_large(self, folder: str, uid: int, uidvalidity: int) -> None:
        RECEIVED.labels(f"imap:{self.mailbox.name}").inc()
        limit = self.settings.max_message_size
        log.warning(
            "imap %s/%s: UID %d is over max_message_size (%d bytes); dead-lettered, not fetched",
            self.mailbox.name,
            folder,
            uid,
            limit,
            extra={"mailbox": self.mailbox.name, "folder": folder},
        )
        self._wait(
            self.handoff.dead_letter(
                id=uuid7(),
                adapter=f"imap:{self.mailbox.name}",
                reason="too-large",
                detail=f"the message is over max_message_size ({limit} bytes); not fetched",
                metadata={
                    "mailbox": self.mailbox.name,
                    "folder": folder,
                    "uid": uid,
                    "uidvalidity": uidvalidity,
                },
            )
        )

    def _after(self, client: IMAPClient, uid: int) -> None:
        if self.mailbox.mark_keyword:
            client.add_flags([uid], [self.mailbox.mark_keyword.encode()])
        if self.mailbox.move_to:
            client.move([uid], self.mailbox.move_to)

    def _ingest(self, raw: bytes, folder: str, uid: int, uidvalidity: int) -> None:
        RECEIVED.labels(f"imap:{self.mailbox.name}").inc()
        message_id = uuid7()
        ctx = EmailContext(
            adapter=f"imap:{self.mailbox.name}",
            message_id=message_id,
            received_at=datetime.now(UTC),
            delivered_to=(self.address,) if self.address else (),
            email_policy=self.email_policy,
            metadata={
                "mailbox": self.mailbox.name,
                "folder": folder,
                "uid": uid,
                "uidvalidity": uidvalidity,
            },
            # The mailbox provider checked DMARC when the mail arrived; only its own
            # (listed, topmost) Authentication-Results header says what it found.
            verdict=judge_authserv(raw, self.mailbox.trusted_authserv_ids),
        )
        try:
            # In a parse process (``parse_workers``), as SMTP does: a mail that keeps the
            # parser busy is killed at parse_timeout_s instead of freezing this process
            # (its thread holds the GIL while it parses; attacker review, 2026-11-30).
            serialized = self._wait(
                self.parsers.run(serialize_email, raw, ctx),
                timeout_s=2 * self.settings.parse_timeout_s + self.settings.timeout_s + 30,
            )
            normalized = serialized.restoring(raw)
        except RetryLater:
            raise  # no parse process could be started: try again later
        except concurrent.futures.CancelledError as exc:
            # The pool stopped under the call (shutdown): not this mail's fault. The
            # checkpoint stays before it; the next start reads it again.
            raise RetryLater("the parse was cancelled at shutdown") from exc
        except Exception as exc:  # noqa: BLE001 - NormalizeError or a parser bug: keep raw, move on
            reason = exc.reason if isinstance(exc, NormalizeError) else "normalizer-error"
            detail = exc.detail if isinstance(exc, NormalizeError) else _describe(exc)
            self._wait(
                self.handoff.dead_letter(
                    id=message_id,
                    adapter=ctx.adapter,
                    reason=reason,
                    detail=detail,
                    raw=Blob.of(raw, "message/rfc822"),
                    metadata=dict(ctx.metadata),
                )
            )
            return
        self._wait(self.handoff.deliver(normalized))

    def _wait(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=timeout_s or self.settings.timeout_s + 30)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        with contextlib.suppress(Exception):
            client.shutdown()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class ImapAdapter(Adapter[ImapSettings]):
    """All configured mailboxes, each polled by its own thread; the checkpoints
    live in the process database (``context.engine``)."""

    name = "imap"
    summary = "IMAP poller: mailboxes read with IDLE or polling, checkpointed per folder"
    settings_class = ImapSettings
    role = "imap"

    @classmethod
    def configured_in(cls, settings: AdapterTables) -> bool:
        imap = cls.settings_from(settings)
        return imap.enabled and bool(imap.mailboxes)

    def __init__(self, settings: ImapSettings, context: AdapterContext) -> None:
        super().__init__(settings, context)
        if context.engine is None:
            raise Stop("imap: the adapter keeps its checkpoints in a database; none was given")
        self.store = ImapStateStore(context.engine)
        self.email_policy = context.email_policy
        self.pollers: list[MailboxPoller] = []
        self.parsers = ParserPool(
            settings.parse_workers, settings.parse_timeout_s, settings.parse_memory_mb
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.parsers.preload(serialize_email.__module__)  # imported while starting
        await self.parsers.warm_up()
        for mailbox in self.settings.mailboxes:
            poller = MailboxPoller(
                mailbox,
                self.settings,
                self.handoff,
                self.store,
                loop=loop,
                parsers=self.parsers,
                email_policy=self.email_policy,
                on_stop=self.context.on_stop,
            )
            poller.start()
            self.pollers.append(poller)
        log.info("imap polling", extra={"mailboxes": [m.name for m in self.settings.mailboxes]})

    async def stop(self) -> None:
        for poller in self.pollers:
            poller.stopping.set()
        deadline = time.monotonic() + 5
        for poller in self.pollers:
            await asyncio.to_thread(poller.join, max(0.0, deadline - time.monotonic()))
            if poller.is_alive():
                log.warning(
                    "imap poller still busy at shutdown", extra={"mailbox": poller.mailbox.name}
                )
        await self.parsers.stop()
