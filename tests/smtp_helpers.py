"""Run the SMTP adapter on a real socket in a background event loop."""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import uvloop

from ingest.handoff import HandOff
from ingest.sdk import AdapterContext
from ingest.smtp import SmtpAdapter
from ingest.spool import Drainer, Spool
from normalize.schema import DeadLetter, InboundMessage
from switchboard.blobs import FileBlobStore
from switchboard.events import read_data, read_meta
from switchboard.kafka import Publisher, make_consumer
from switchboard.settings import MIN_POLL_TIMEOUT_MS, KafkaSettings, SmtpSettings
from switchboard.topics import DEADLETTER, INBOUND

QUEUED = re.compile(r"queued as ([0-9a-f-]{36})")


class RunningSmtp:
    def __init__(self, adapter: SmtpAdapter, blobs: FileBlobStore, publisher: Publisher) -> None:
        self.adapter = adapter
        self.blobs = blobs
        self.publisher = publisher

    @property
    def port(self) -> int:
        return self.adapter.port

    def client(self, timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)

    def send(
        self,
        raw: bytes,
        rcpts: Sequence[str] = ("support@example.com",),
        mail_from: str = "alice@example.org",
        mail_options: Sequence[str] = (),
    ) -> tuple[int, str]:
        """One SMTP transaction; returns the DATA reply (code, text)."""
        with self.client() as client:
            client.ehlo("client.example.org")
            code, text = client.mail(mail_from, list(mail_options))
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
            code, reply = client.data(raw)
            return code, reply.decode()


@contextmanager
def smtp_server(
    kafka: KafkaSettings,
    data_dir: Path,
    *,
    spool: Spool | None = None,
    spool_after_s: float = 1.0,
    handoff_type: type[HandOff] = HandOff,
    on_stop: Callable[[str], None] | None = None,
    event_loop: str = "uvloop",
    **overrides: object,
) -> Iterator[RunningSmtp]:
    """An SMTP edge on its own thread, on uvloop as `switchboard` runs it, or on
    asyncio's loop (``event_loop="asyncio"``, `SWITCHBOARD_EVENT_LOOP=asyncio`)."""
    settings = SmtpSettings(
        **{  # type: ignore[arg-type]
            "port": 0,
            "domains": ["example.com"],
            "hostname": "mx.test.local",
            "parse_workers": 0,  # in-process; one test covers the worker process path
            # No sender checks against the real DNS unless a test asks (test_mailauth.py
            # serves its own records): results would depend on the Internet.
            "verify": False,
            **overrides,
        }
    )
    publisher = Publisher(kafka)
    blobs = FileBlobStore(data_dir / "blobs")
    handoff = handoff_type(publisher, blobs, spool=spool, spool_after_s=spool_after_s)
    context = (
        AdapterContext(handoff) if on_stop is None else AdapterContext(handoff, on_stop=on_stop)
    )
    adapter = SmtpAdapter(settings, context)
    drainer = (
        Drainer(spool, publisher.publish_many, max_event_bytes=handoff.max_event_bytes)
        if spool is not None
        else None
    )
    if drainer is not None:
        drainer.begin()
    loop = uvloop.new_event_loop() if event_loop == "uvloop" else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="smtp-test-loop")
    thread.start()
    asyncio.run_coroutine_threadsafe(adapter.start(), loop).result(10)
    try:
        yield RunningSmtp(adapter, blobs, publisher)
    finally:
        asyncio.run_coroutine_threadsafe(adapter.stop(), loop).result(15)
        if drainer is not None:
            drainer.end()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        publisher.close(timeout_s=2)


def queued_id(reply: str) -> UUID:
    match = QUEUED.search(reply)
    assert match, f"no queue id in {reply!r}"
    return UUID(match.group(1))


def collect(
    kafka: KafkaSettings, group: str, ids: set[UUID], timeout_s: float = 30
) -> tuple[dict[UUID, InboundMessage], dict[UUID, DeadLetter]]:
    """Read inbound and dead-letter events until every id in ``ids`` was seen.

    Fails if one id is published twice as a message: that would be a duplicate.
    """
    inbound: dict[UUID, InboundMessage] = {}
    dead: dict[UUID, DeadLetter] = {}
    wanted = {str(i) for i in ids}
    consumer = make_consumer(kafka, group_id=group, topics=[INBOUND, DEADLETTER])
    deadline = time.monotonic() + timeout_s
    try:
        while len(inbound) + len(dead) < len(ids) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS).values():
                for record in batch:
                    if read_meta(record.headers).subject not in wanted:
                        continue
                    if record.topic == INBOUND:
                        message = read_data(record.value, InboundMessage)
                        assert message.id not in inbound, f"{message.id} published twice"
                        inbound[message.id] = message
                    else:
                        letter = read_data(record.value, DeadLetter)
                        dead[letter.id] = letter
    finally:
        consumer.close()
    return inbound, dead
