"""A message whose event would be larger than Kafka takes must not stop the others.

Found 2026-11-29: a 5.6 MB plain-text mail made an event Kafka refused
(max_request_size, 4 MiB); the spool kept it in front of every later message,
so nothing reached Kafka again from that process.
"""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ingest.handoff import HandOff
from ingest.spool import Drainer, Spool
from normalize.content import BODY_LIMITS, Blob, Normalized
from normalize.schema import DeadLetter
from switchboard.blobs import FileBlobStore
from switchboard.events import read_data, read_meta
from switchboard.kafka import Publisher, make_consumer
from switchboard.settings import KafkaSettings
from switchboard.topics import DEADLETTER, INBOUND
from tests.factories import inbound_message
from tests.kafka_helpers import consume_until
from tests.router_helpers import inbound_event
from tests.smtp_helpers import collect, queued_id, smtp_server

pytestmark = pytest.mark.integration


def _read(kafka: KafkaSettings, topics: list[str], subjects: set[str], group: str) -> list[Any]:
    """The records of ``topics`` whose CloudEvents subject is one of ``subjects``."""
    consumer = make_consumer(kafka, group_id=group, topics=topics)
    try:
        found = consume_until(
            consumer,
            lambda records: {read_meta(r.headers).subject for r in records} >= subjects,
        )
    finally:
        consumer.close()
    return [r for r in found if read_meta(r.headers).subject in subjects]


def _mail(message_id: str, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "support@example.com"
    msg["Subject"] = "Long"
    msg["Message-ID"] = f"<{message_id}@example.org>"
    msg.set_content(text)
    return msg.as_bytes(policy=SMTP)  # CRLF: a bare-LF mail is one long line


def test_a_huge_text_mail_is_clipped_and_the_next_one_is_not_held_behind_it(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10**9, max_messages=10**6)
    line = "The quick brown fox jumps over the lazy dog, again and again. " * 15 + "\n"
    huge = _mail(f"huge-{unique}", line * 6000)  # about 5.6 MB of text
    with smtp_server(
        kafka_settings, tmp_path, spool=spool, max_message_size=20 * 1024**2
    ) as server:
        code, reply = server.send(huge)
        assert code == 250, reply
        code, small = server.send(_mail(f"small-{unique}", "hello"))
        assert code == 250, small
        ids = {queued_id(reply), queued_id(small)}
        inbound, dead = collect(kafka_settings, f"big-{unique}", ids, timeout_s=30)
        assert set(inbound) == ids, (inbound.keys(), dead.keys())
        message = inbound[queued_id(reply)]
        assert message.text is not None
        assert len(message.text) == BODY_LIMITS["text"]
        clipped = message.metadata["clipped"]
        assert isinstance(clipped, dict)
        assert isinstance(clipped["text"], int)
        assert clipped["text"] > 5_500_000  # the length of the whole text
        assert message.raw is not None
        assert server.blobs.get(message.raw.sha256) == huge  # all of it kept
    assert spool.messages == 0


def test_an_event_still_too_large_is_dead_lettered_with_its_raw_blob(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """Bodies are clipped; anything else an adapter puts in (metadata here) that
    still makes the event too large becomes a dead letter instead of a wedge."""
    raw = Blob.of(b"raw " + unique.encode(), "application/json")
    message = inbound_message(raw=raw.ref, metadata={"blob": "x" * (5 * 1024**2)})
    publisher = Publisher(kafka_settings)
    handoff = HandOff(publisher, FileBlobStore(tmp_path / "blobs"))
    try:
        receipt = asyncio.run(handoff.deliver(Normalized(message=message, blobs=(raw,))))
        assert receipt.ack is not None
        assert receipt.ack.topic == DEADLETTER
    finally:
        handoff.close()
        publisher.close()
    [record] = _read(kafka_settings, [DEADLETTER], {str(message.id)}, f"big-dl-{unique}")
    letter = read_data(record.value, DeadLetter)
    assert letter.reason == "too-large"
    assert letter.raw == raw.ref


def test_a_spool_holding_an_oversized_event_drains_past_it(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """A spool written before the clipping may hold one: it becomes a dead letter,
    and the events behind it are published."""
    spool = Spool(tmp_path / "old.sqlite3", max_bytes=10**9, max_messages=10**6)
    big = inbound_event(inbound_message(text="y" * (5 * 1024**2), subject=f"big {unique}"))
    after = inbound_event(inbound_message(text="fine", subject=f"after {unique}"))
    spool.append(INBOUND, big)
    spool.append(INBOUND, after)
    publisher = Publisher(kafka_settings)
    drainer = Drainer(spool, publisher.publish_many, max_event_bytes=publisher.max_event_bytes)
    counted = ("switchboard_dead_letters_total", {"stage": "ingest", "reason": "too-large"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    try:
        assert drainer.drain_once() == 2
    finally:
        publisher.close()
    assert spool.messages == 0
    # Counted like every dead letter (it was not, before).
    assert REGISTRY.get_sample_value(*counted) == before + 1
    subjects = {big.subject or "", after.subject or ""}
    seen = _read(kafka_settings, [INBOUND, DEADLETTER], subjects, f"big-spool-{unique}")
    assert {(r.topic, read_meta(r.headers).subject) for r in seen} == {
        (DEADLETTER, big.subject),
        (INBOUND, after.subject),
    }
