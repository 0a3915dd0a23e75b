"""The embedded broker's journal: on disk under concurrency, in the hand-off in front
of a real broker, pruned and replayed against the real router and queue tables, and
`switchboard status` reading the broker's real log ends."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import insert

from ingest import handoff as handoff_module
from ingest.handoff import HandOff, Receipt
from ingest.journal import Journal, read_journal_depth
from ingest.spool import Spool
from normalize.content import Normalized
from router.tables import outbox
from sinks.queue import applied
from switchboard.blobs import FileBlobStore
from switchboard.bootstrap import ROLES, make_journal
from switchboard.broker import EmbeddedBroker
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import TYPE_ROUTED, Event, read_meta
from switchboard.ids import uuid7
from switchboard.kafka import Ack, Publisher, PublishError, make_consumer
from switchboard.recovery import JournalKeeper, read_recovery
from switchboard.settings import KafkaSettings, Settings, SpoolSettings
from switchboard.status import log_ends
from switchboard.topics import DEADLETTER, INBOUND, ROUTED, ensure_topics
from tests.factories import inbound_message
from tests.kafka_helpers import consume_until
from tests.router_helpers import fresh_kafka, inbound_event

pytestmark = pytest.mark.integration


def _event(n: int) -> tuple[Event, str]:
    message = inbound_message(text=f"message {n}")
    return inbound_event(message), str(message.id)


def test_concurrent_appends_are_all_kept_byte_for_byte_and_survive_a_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    journal = Journal(path)
    events = [_event(n) for n in range(200)]

    def append(part: list[tuple[Event, str]]) -> None:
        for event, message_id in part:
            journal.append(INBOUND, event, message_id)

    threads = [threading.Thread(target=append, args=(events[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert journal.messages == 200
    kept = {e.event.id: e for e in journal.entries(1000)}
    for event, message_id in events:
        assert kept[event.id].event.value() == event.value()
        assert kept[event.id].event.headers() == event.headers()
        assert kept[event.id].message_id == message_id
    journal.close()

    reopened = Journal(path)
    assert reopened.messages == 200
    first = reopened.entries(10)
    reopened.mark_recorded([e.seq for e in first[:5]])
    reopened.remove([e.seq for e in first])
    assert reopened.messages == 190
    assert sum(e.recorded for e in reopened.entries(1000)) == 0
    depth = read_journal_depth(path)
    assert depth is not None
    assert depth.messages == 190
    reopened.close()


def test_a_spool_file_without_a_journal_has_no_depth(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    Spool(path, max_bytes=10**6, max_messages=10).close()
    assert read_journal_depth(path) is None


def test_the_journal_is_only_for_switchboard_run_on_the_embedded_broker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert make_journal(settings, ROLES, None) is None  # external Kafka: its replication
    broker = EmbeddedBroker()  # not started: only its presence matters here
    assert make_journal(settings, frozenset({"smtp", "http"}), broker) is None
    off = Settings(data_dir=tmp_path, spool=SpoolSettings(journal=False))
    assert make_journal(off, ROLES, broker) is None
    journal = make_journal(settings, ROLES, broker)
    assert journal is not None
    journal.close()


def test_the_hand_off_journals_what_the_broker_acknowledged(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    journal = Journal(tmp_path / "spool.sqlite3")
    publisher = Publisher(kafka_settings)
    handoff = HandOff(publisher, FileBlobStore(tmp_path / "blobs"), journal=journal)
    message = inbound_message(text="journaled")
    try:
        receipt = asyncio.run(handoff.deliver(Normalized(message, ())))
        assert receipt.ack is not None
        [entry] = journal.entries(10)
        assert entry.message_id == str(message.id)
        consumer = KafkaConsumer(
            **kafka_settings.client_config(), enable_auto_commit=False, consumer_timeout_ms=5000
        )
        tp = TopicPartition(INBOUND, receipt.ack.partition)
        consumer.assign([tp])
        consumer.seek(tp, receipt.ack.offset)
        record = next(iter(consumer))
        consumer.close()
        assert read_meta(record.headers).id == entry.event.id
        assert record.value == entry.event.value()
    finally:
        handoff.close()
        publisher.close()
        journal.close()


def test_prune_and_replay_follow_the_router_and_the_queue(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sb.db'}")
    upgrade(engine)
    journal = Journal(tmp_path / "spool.sqlite3")
    # Three accepted messages: one routed and applied, one routed and not applied,
    # one the router never saw (the broker forgot it).
    (done, done_id), (half, half_id), (lost, lost_id) = (_event(n) for n in range(3))
    for event, message_id in ((done, done_id), (half, half_id), (lost, lost_id)):
        journal.append(INBOUND, event, message_id)
    routed = {
        m: Event(type=TYPE_ROUTED, source="t", key="k", data=b"{}") for m in (done_id, half_id)
    }
    with engine.begin() as c:
        for message_id, event in routed.items():
            c.execute(
                insert(outbox).values(
                    id=UUID(event.id),
                    message_id=UUID(message_id),
                    seq=0,
                    topic=ROUTED,
                    key=event.key,
                    type=event.type,
                    source=event.source,
                    time=event.time,
                    data=event.value(),
                    pending=False,
                )
            )
        c.execute(insert(applied).values(event_id=UUID(routed[done_id].id), applied_at=done.time))
    with fresh_kafka() as kafka:
        publisher = Publisher(kafka)
        keeper = JournalKeeper(journal, publisher, engine, engine, data_dir=tmp_path)
        try:
            assert keeper.prune() == 1  # routed and applied: forgotten
            assert {e.message_id: e.recorded for e in journal.entries(10)} == {
                half_id: True,
                lost_id: False,
            }
            result = keeper.replay("test")
            assert (result.messages, result.events) == (1, 1)
            consumer = make_consumer(kafka, group_id="journal-test", topics=[INBOUND, ROUTED])
            records = consume_until(consumer, lambda rs: len(rs) >= 2)
            consumer.close()
        finally:
            publisher.close()
            journal.close()
            engine.dispose()
    assert {(r.topic, read_meta(r.headers).id) for r in records} == {
        (INBOUND, lost.id),
        (ROUTED, routed[half_id].id),
    }
    report = read_recovery(tmp_path)
    assert report is not None
    assert report["replayed_messages"] == 1
    assert report["broker_lost_memory"] is True


@dataclass
class _Watched:
    """A keeper watching a real embedded broker; its journal holds one message the
    broker is about to forget."""

    keeper: JournalKeeper
    broker: EmbeddedBroker
    kafka: KafkaSettings
    publisher: Publisher
    lost: Event


@contextmanager
def _watched_broker(data_dir: Path) -> Iterator[_Watched]:
    engine = make_engine(f"sqlite:///{data_dir / 'sb.db'}")
    upgrade(engine)
    journal = Journal(data_dir / "spool.sqlite3")
    lost, lost_id = _event(0)  # acknowledged, then forgotten by the broker
    journal.append(INBOUND, lost, lost_id)
    broker = EmbeddedBroker().start()  # from this (the main) thread: it outlives the test
    kafka = KafkaSettings(bootstrap=broker.bootstrap, partitions=1)
    ensure_topics(kafka)
    publisher = Publisher(kafka)
    keeper = JournalKeeper(
        journal, publisher, engine, engine, data_dir=data_dir, broker=broker, kafka=kafka
    )
    try:
        yield _Watched(keeper, broker, kafka, publisher, lost)
    finally:
        publisher.close()
        broker.stop()
        journal.close()
        engine.dispose()


def _kill(broker: EmbeddedBroker) -> None:
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    while broker.running:
        time.sleep(0.01)


def _report_after_a_kill(watched: _Watched, data_dir: Path) -> dict[str, Any] | None:
    """Kill the broker under the running keeper; the recovery's report, or None if
    none came within a minute."""

    async def scenario() -> dict[str, Any] | None:
        await watched.keeper.start()  # the watch: starts the broker on this loop's thread
        try:
            _kill(watched.broker)
            deadline = time.monotonic() + 60
            while (report := read_recovery(data_dir)) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return report
        finally:
            await watched.keeper.stop()

    return asyncio.run(scenario())


def test_a_broker_that_dies_again_mid_replay_is_started_again_and_the_replay_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch restarts a dead broker and replays; the restarted broker dies again
    while the replay publishes. The keeper must start it once more and replay on
    it: before, the replay retried the dead broker forever and nothing restarted it
    (CI of 2026-12-01: the fault test's second kill landed inside the recovery)."""
    with _watched_broker(tmp_path) as watched:
        publish_many = watched.publisher.publish_many
        replays = 0

        def dies_during_the_first_replay(
            items: Sequence[tuple[str, Event]], timeout_s: float | None = None
        ) -> list[Ack]:
            nonlocal replays
            replays += 1
            if replays == 1:
                _kill(watched.broker)
                raise PublishError("not acknowledged: the broker died")
            return publish_many(items, timeout_s)

        monkeypatch.setattr(watched.publisher, "publish_many", dies_during_the_first_replay)
        report = _report_after_a_kill(watched, tmp_path)
        assert report is not None, "no recovery completed: the replay kept trying a dead broker"
        assert (report["recoveries"], report["replayed_messages"]) == (1, 1)
        assert (watched.keeper.broker_restarts, replays) == (2, 2)
        assert watched.broker.running
        consumer = make_consumer(watched.kafka, group_id="journal-test", topics=[INBOUND])
        records = consume_until(consumer, lambda rs: len(rs) >= 1)
        consumer.close()
        assert [read_meta(r.headers).id for r in records] == [watched.lost.id]


def test_a_broker_that_cannot_be_started_once_is_started_at_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the broker again failed with an OSError (no memory for a process
    after the OOM killer, the log file): the keeper's thread died of it before, and
    nothing restarted the broker or pruned the journal again (review, 2026-12-01)."""
    with _watched_broker(tmp_path) as watched:
        start = watched.broker.start
        attempts = 0

        def fails_once(timeout_s: float = 10.0) -> EmbeddedBroker:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise OSError(12, "Cannot allocate memory")
            return start(timeout_s)

        monkeypatch.setattr(watched.broker, "start", fails_once)
        report = _report_after_a_kill(watched, tmp_path)
        assert report is not None, "the broker was not started again"
        assert attempts == 2
        assert watched.broker.running


def test_status_reads_the_real_end_of_a_tansu_log() -> None:
    with fresh_kafka(partitions=1) as kafka:
        publisher = Publisher(kafka)
        # One batch of five records: Tansu's "latest offset" is the batch's base + 1.
        publisher.publish_many([(INBOUND, _event(n)[0]) for n in range(5)])
        publisher.close()
        consumer = KafkaConsumer(**kafka.client_config())
        tp = TopicPartition(INBOUND, 0)
        try:
            reported = consumer.end_offsets([tp])
            assert log_ends(consumer, reported) == {tp: 5}
        finally:
            consumer.close()


def test_dead_letters_are_forgotten_by_event_id_or_all_at_once(tmp_path: Path) -> None:
    """Ingest's dead letters stay until the archive has written them (`forget`, by
    the event ids of the file); with the archive off, a start drops what an earlier
    run journaled (`forget_topic`), which would otherwise be replayed forever."""
    journal = Journal(tmp_path / "spool.sqlite3")
    try:
        kept = [_event(n) for n in range(3)]
        for event, message_id in kept:
            journal.append(DEADLETTER, event, message_id)
        inbound, message_id = _event(9)
        journal.append(INBOUND, inbound, message_id)
        assert journal.messages == 4
        journal.forget([kept[0][0].id, "not-an-event-id"])
        assert journal.messages == 3
        assert {e.event.id for e in journal.entries(10)} == {
            kept[1][0].id,
            kept[2][0].id,
            inbound.id,
        }
        depth = read_journal_depth(tmp_path / "spool.sqlite3")
        assert depth is not None
        assert (depth.messages, depth.dead_letters) == (3, 2)
        assert journal.forget_topic(DEADLETTER) == 2
        assert [e.event.id for e in journal.entries(10)] == [inbound.id]
        assert journal.messages == 1
    finally:
        journal.close()


def test_dead_letters_stop_going_to_the_journal_past_its_cap(
    tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They leave the journal once the archive has written them; an archive that
    cannot write would let them pile up and be replayed at every start. Past the cap
    a dead letter still goes to the broker, acknowledged, without a journal entry."""
    monkeypatch.setattr(handoff_module, "MAX_JOURNALED_DEAD_LETTERS", 2)
    journal = Journal(tmp_path / "spool.sqlite3")
    publisher = Publisher(kafka_settings)
    handoff = HandOff(publisher, FileBlobStore(tmp_path / "blobs"), journal=journal)
    handoff.journal_dead_letters = True

    async def letters() -> list[Receipt]:
        return [
            await handoff.dead_letter(
                id=uuid7(), adapter="smtp", reason="no-sender", detail=f"letter {n}"
            )
            for n in range(4)
        ]

    try:
        receipts = asyncio.run(letters())
        assert all(r.ack is not None for r in receipts)  # every one on the broker
        assert journal.count(DEADLETTER) == 2
        refused = asyncio.run(
            handoff.refused(
                id=uuid7(),
                adapter="smtp",
                route="smtp",
                reason="auth",
                detail="refused",
                body=b"x",
                media_type="text/plain",
            )
        )
        assert refused is not None
        assert refused.ack is not None
        assert journal.count(DEADLETTER) == 2  # evidence of a refusal: never journaled
    finally:
        handoff.close()
        publisher.close()
        journal.close()
