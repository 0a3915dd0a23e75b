"""Run the IMAP adapter in a background event loop against a real Dovecot."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ingest.handoff import HandOff
from ingest.imap import ImapAdapter
from ingest.imap_state import ImapStateStore
from ingest.sdk import AdapterContext
from switchboard.blobs import FileBlobStore
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.kafka import Publisher
from switchboard.settings import ImapSettings, KafkaSettings, MailboxSettings
from tests.dovecot import PASSWORD, USER, Dovecot


def mailbox(
    dovecot: Dovecot, name: str, monkeypatch_env: Callable[[str, str], None], **overrides: object
) -> MailboxSettings:
    monkeypatch_env("IMAP_TEST_PASSWORD", PASSWORD)
    fields: dict[str, object] = {
        "name": name,
        "host": "127.0.0.1",
        "port": dovecot.imap_port,
        "security": "none",
        "username": USER,
        "password_env": "IMAP_TEST_PASSWORD",
        "backfill": "all",
    }
    fields.update(overrides)
    return MailboxSettings.model_validate(fields)


def mail(tag: str, subject: str = "Help", sender: str = "alice@example.org") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{tag}@example.org>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        f"\r\nMessage {tag}\r\n"
    ).encode()


@contextmanager
def imap_adapter(
    kafka: KafkaSettings,
    data_dir: Path,
    boxes: list[MailboxSettings],
    *,
    handoff_type: type[HandOff] = HandOff,
    on_stop: Callable[[str], None] | None = None,
    **overrides: object,
) -> Iterator[ImapStateStore]:
    # In-thread parsing unless a test asks for the parse process (one test does).
    fields: dict[str, object] = {
        "backoff_max_s": 1,
        "poll_interval_s": 1,
        "parse_workers": 0,
        **overrides,
    }
    settings = ImapSettings(mailboxes=boxes, **fields)  # type: ignore[arg-type]
    publisher = Publisher(kafka)
    handoff = handoff_type(publisher, FileBlobStore(data_dir / "blobs"))
    engine = make_engine(f"sqlite:///{data_dir / 'imap.db'}")
    upgrade(engine)
    store = ImapStateStore(engine)
    context = AdapterContext(handoff, engine=engine)
    if on_stop is not None:  # the default stops this process, as it does in production
        context = AdapterContext(handoff, engine=engine, on_stop=on_stop)
    adapter = ImapAdapter(settings, context)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(adapter.start(), loop).result(10)
    try:
        yield store
    finally:
        asyncio.run_coroutine_threadsafe(adapter.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        handoff.close()
        publisher.close(timeout_s=2)


def wait_for(predicate: Callable[[], bool], timeout_s: float, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError at the deadline."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout_s}s")
