"""The consumer runtime against the real broker and PostgreSQL.

A handler writes each record's value into a PostgreSQL table, as the router and
the queue sink write theirs. One record carries a NUL byte: PostgreSQL refuses it
(a real ``DataError``). Before the runtime, that error counted as an outage and
the batch was rewound forever; now the record is isolated, tried N times, and
dead-lettered with the original bytes, and everything around it is written and
committed. A database that is away is the opposite case: retried, never
dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata
from sqlalchemy import Engine, text

from sinks.archive import ArchiveHandler
from sinks.archive_files import LocalArchive
from sinks.settings import ArchiveSettings
from switchboard.bootstrap import _readiness
from switchboard.consumer import ConsumerRuntime, RecordHandler, _Forgetting
from switchboard.db import make_engine
from switchboard.events import Event
from switchboard.settings import ConsumerSettings, KafkaSettings, Settings
from switchboard.topics import DEADLETTER, ensure_topics
from tests.kafka_helpers import consume_until

pytestmark = pytest.mark.integration


class TableHandler(RecordHandler):
    """Writes every record's value into ``seen``, idempotent on its coordinates."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        self.calls += 1
        with self.engine.begin() as c:
            for record in records:
                c.execute(
                    text(
                        "INSERT INTO seen (part, off, value) VALUES (:p, :o, :v) "
                        "ON CONFLICT DO NOTHING"
                    ),
                    {"p": record.partition, "o": record.offset, "v": record.value.decode()},
                )
        return []


@pytest.fixture
def table(postgres_schema_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_schema_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE seen (part int, off bigint, value text, UNIQUE (part, off))"))
    yield engine
    engine.dispose()


@pytest.fixture
def topic(kafka_settings: KafkaSettings, unique: str) -> str:
    name = f"runtime-test-{unique}"
    ensure_topics(kafka_settings, (name,))
    return name


def _produce(kafka: KafkaSettings, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(**kafka.client_config())
    try:
        for value in values:
            producer.send(topic, value=value, key=b"same-partition")
        producer.flush(10)
    finally:
        producer.close()


@contextmanager
def running(runtime: ConsumerRuntime) -> Iterator[ConsumerRuntime]:
    thread = threading.Thread(target=runtime.run_forever, daemon=True)
    thread.start()
    try:
        yield runtime
    finally:
        runtime.request_stop()
        thread.join(20)


def _until(check: Callable[[], object], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _rows(engine: Engine) -> list[str]:
    with engine.connect() as c:
        return [str(v) for v in c.execute(text("SELECT value FROM seen ORDER BY off")).scalars()]


def _filled_partition(consumer: KafkaConsumer, topic: str) -> TopicPartition:
    """The partition of ``topic`` the records went to (one key: one partition)."""
    return next(
        TopicPartition(topic, p)
        for p in consumer.partitions_for_topic(topic) or set()
        if consumer.end_offsets([TopicPartition(topic, p)])[TopicPartition(topic, p)] > 0
    )


def _letters(kafka: KafkaSettings, group: str, wanted: int) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(
        DEADLETTER, auto_offset_reset="earliest", enable_auto_commit=False, **kafka.client_config()
    )
    try:

        def ours(records: list[Any]) -> list[dict[str, Any]]:
            letters = [json.loads(r.value) for r in records]
            return [x for x in letters if x.get("metadata", {}).get("group") == group]

        return ours(consume_until(consumer, lambda rs: len(ours(rs)) >= wanted, timeout_s=20))
    finally:
        consumer.close()


def test_a_nul_byte_postgres_refuses_is_dead_lettered_and_the_partition_moves_on(
    kafka_settings: KafkaSettings, table: Engine, topic: str, unique: str
) -> None:
    values = [f"ok-{i}".encode() for i in range(10)]
    values.insert(5, b"bad\x00value")
    _produce(kafka_settings, topic, values)
    group = f"runtime-{unique}"
    runtime = ConsumerRuntime(
        kafka_settings,
        TableHandler(table),
        name="test-sink",
        group_id=group,
        topics=[topic],
        policy=ConsumerSettings(max_attempts=2, backoff_max_s=0.5),
    )
    with running(runtime):
        _until(lambda: len(_rows(table)) == 10 and runtime.dead_lettered == 1)
        letters = _letters(kafka_settings, group, 1)
        _until(lambda: runtime.last_commit is not None)
    assert _rows(table) == [f"ok-{i}" for i in range(10)]
    assert len(letters) == 1
    letter = letters[0]
    assert letter["stage"] == "sink"
    assert letter["reason"] == "poison"
    assert letter["detail"].startswith("DataError")
    assert letter["metadata"]["attempts"] == 2
    assert letter["metadata"]["topic"] == topic
    assert letter["metadata"]["offset"] == 5
    assert base64.b64decode(letter["metadata"]["value_base64"]) == b"bad\x00value"
    # Everything, the poison included, is committed: a restart does not stall on it.
    check = KafkaConsumer(
        group_id=group, enable_auto_commit=False, **kafka_settings.client_config()
    )
    try:
        partition = _filled_partition(check, topic)
        assert check.committed(partition) == 11
    finally:
        check.close()


@pytest.mark.slow
def test_a_database_outage_is_retried_and_never_dead_lettered(
    kafka_settings: KafkaSettings, table: Engine, topic: str, unique: str
) -> None:
    _produce(kafka_settings, topic, [f"m-{i}".encode() for i in range(5)])
    # Nothing listens on port 1: a real "connection refused" from psycopg.
    away = make_engine("postgresql://postgres@127.0.0.1:1/test")
    handler = TableHandler(away)
    group = f"runtime-{unique}"
    runtime = ConsumerRuntime(
        kafka_settings,
        handler,
        name="test-sink",
        group_id=group,
        topics=[topic],
        policy=ConsumerSettings(max_attempts=1, backoff_max_s=0.3),
    )
    with running(runtime):
        _until(lambda: runtime.retries >= 3)
        assert _rows(table) == []
        handler.engine = table  # the database is back
        _until(lambda: len(_rows(table)) == 5)
    assert runtime.dead_lettered == 0
    assert _rows(table) == [f"m-{i}" for i in range(5)]
    away.dispose()


class Blocking(RecordHandler):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.die = False

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        if self.die:
            raise SystemExit("a bug that kills the thread")
        self.release.wait(30)
        return []


# The thread's death is the point of the test; pytest would report it as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_readyz_names_a_stuck_or_dead_consumer(
    kafka_settings: KafkaSettings, table: Engine, topic: str, unique: str
) -> None:
    handler = Blocking()
    runtime = ConsumerRuntime(
        kafka_settings, handler, name="stuck-sink", group_id=f"g-{unique}", topics=[topic]
    )
    runtime.stuck_after_s = 1.0
    started = threading.Event()
    started.set()
    readiness = _readiness(
        # Only the component check matters here; Kafka and the database are up.
        _settings(kafka_settings),
        table,
        started,
        [runtime],
    )
    thread = threading.Thread(target=runtime.run_forever, daemon=True)
    runtime._thread = thread  # what start() does for a component
    thread.start()
    try:
        _produce(kafka_settings, topic, [b"x"])
        _until(lambda: runtime.liveness() is not None)
        assert "stuck-sink: no progress for" in str(runtime.liveness())
        readiness._cached = None
        checks = asyncio.run(readiness.evaluate())
        assert "stuck-sink: no progress" in checks["components"]
        handler.die = True
        handler.release.set()
        _produce(kafka_settings, topic, [b"y"])
        thread.join(20)
        assert runtime.liveness() == "stuck-sink: its thread has stopped"
        readiness._cached = None
        checks = asyncio.run(readiness.evaluate())
        assert checks["components"] == "RuntimeError: stuck-sink: its thread has stopped"
    finally:
        runtime.request_stop()
        handler.release.set()


def _settings(kafka: KafkaSettings) -> Settings:
    return Settings(kafka=kafka)


class CollectorWatcher(TableHandler):
    """Notes whether the cyclic garbage collector runs while a poll is applied, and
    leaves a reference cycle behind in every poll."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.during: list[bool] = []
        self.cycles: list[weakref.ref[Any]] = []

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        self.during.append(gc.isenabled())
        cycle: dict[str, Any] = {}
        cycle["self"] = cycle
        holder = Cycle()
        holder.me = holder
        self.cycles.append(weakref.ref(holder))
        return super().handle(records)


class Cycle:
    me: object = None


def test_the_collector_pauses_during_a_poll_and_its_cycles_are_collected_after(
    kafka_settings: KafkaSettings, table: Engine, topic: str, unique: str
) -> None:
    assert gc.isenabled()
    handler = CollectorWatcher(table)
    runtime = ConsumerRuntime(
        kafka_settings, handler, name="gc-sink", group_id=f"g-{unique}", topics=[topic]
    )
    with running(runtime):
        _produce(kafka_settings, topic, [b"a", b"b"])
        _until(lambda: len(_rows(table)) == 2)
        _produce(kafka_settings, topic, [b"c"])
        _until(lambda: len(_rows(table)) == 3)
    assert handler.during
    assert not any(handler.during)  # paused in every poll
    assert gc.isenabled()  # and on again after
    gc.collect()  # what the next automatic collection does, without waiting for it
    assert all(ref() is None for ref in handler.cycles)  # nothing a poll left in a cycle stays


def test_offsets_a_handler_releases_later_are_committed_while_the_partition_is_quiet(
    kafka_settings: KafkaSettings, topic: str, unique: str, tmp_path: Path
) -> None:
    """The archive holds its commit back to the first row it has not written yet. Its
    file is written at an idle poll, once the rows are roll_s old; before, that
    partition's offset was committed only with its next record, so on a quiet topic
    it stayed at the file's first row (and a restart read the file's rows again)."""
    _produce(kafka_settings, topic, [b"one", b"two", b"three"])
    handler = ArchiveHandler(LocalArchive(tmp_path), ArchiveSettings(roll_s=1.0))
    group = f"archive-{unique}"
    runtime = ConsumerRuntime(
        kafka_settings, handler, name="test-archive", group_id=group, topics=[topic]
    )
    check = KafkaConsumer(
        group_id=group, enable_auto_commit=False, **kafka_settings.client_config()
    )
    try:
        partition = _filled_partition(check, topic)
        with running(runtime):
            _until(lambda: handler.files == 1)
            assert [
                (p.first, p.last) for p in handler.archive.parts(topic, partition.partition)
            ] == [(0, 2)]
            # No record arrives after the file: the commit follows it anyway.
            _until(lambda: check.committed(partition) == 3, timeout_s=15)
    finally:
        check.close()


def test_a_revoked_partition_is_forgotten_before_the_handlers_listener_runs() -> None:
    """Its next owner commits it from now on: an offset of ours, handled before the
    revocation, would move the group's offset back at our next idle poll."""
    seen: list[tuple[str, list[TopicPartition]]] = []

    class Inner(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
            seen.append(("revoked", list(revoked)))

        def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
            seen.append(("assigned", list(assigned)))

    runtime = ConsumerRuntime(
        KafkaSettings(), RecordHandler(), name="t", group_id="g", topics=["t"]
    )
    kept, gone = TopicPartition("t", 0), TopicPartition("t", 1)
    runtime._handled.update({kept: 5, gone: 9})
    runtime._committed.update({kept: 5, gone: 7})
    listener = _Forgetting(runtime, Inner())
    listener.on_partitions_revoked([gone])
    listener.on_partitions_assigned([gone])
    assert runtime._handled == {kept: 5}
    assert runtime._committed == {kept: 5}
    assert seen == [("revoked", [gone]), ("assigned", [gone])]


def test_nothing_released_is_committed_while_a_rewind_to_the_start_is_pending() -> None:
    """The embedded broker came back empty: an offset of the old log committed to the
    new one would be past its end, and a rejoining member would skip what the new log
    holds below it. The rewind clears the offsets; until then nothing is committed."""
    commits: list[object] = []

    class Consumer:
        def commit(self, offsets: object) -> None:
            commits.append(offsets)

    runtime = ConsumerRuntime(
        KafkaSettings(), RecordHandler(), name="t", group_id="g", topics=["t"]
    )
    runtime._handled[TopicPartition("t", 0)] = 5000
    runtime.rewind_to_start()
    runtime._commit_released(Consumer())
    assert commits == []
    runtime._rewind_to_start.clear()  # as the rewind does, after clearing the offsets
    runtime._commit_released(Consumer())
    assert len(commits) == 1  # without a pending rewind, the same call commits


def test_a_failed_commit_of_the_earliest_offsets_after_a_rewind_is_tried_again(
    kafka_settings: KafkaSettings, topic: str, unique: str
) -> None:
    """The embedded broker came back empty, and the group still has an offset of the
    old log past the new one's end. The rewind commits the earliest offsets; when that
    commit failed (a rebalance in progress), it was only logged, and a quiet
    partition kept the old offset: a rejoining member would resume there and skip
    what the new log holds below it (review, 2026-12-01)."""
    group = f"rewind-{unique}"
    check = KafkaConsumer(
        group_id=group, enable_auto_commit=False, **kafka_settings.client_config()
    )
    quiet = TopicPartition(topic, 0)
    check.commit({quiet: OffsetAndMetadata(50, "", -1)})  # the old log's offset
    assert check.committed(quiet) == 50

    class FailingOnce(ConsumerRuntime):
        fail_next = False

        def connected(self, consumer: KafkaConsumer) -> None:
            real = consumer.commit

            def commit(offsets: Any = None) -> Any:  # noqa: ANN401 - kafka-python's
                if self.fail_next:
                    self.fail_next = False
                    raise CommitFailedError("the group is rebalancing")
                return real(offsets)

            consumer.commit = commit

    runtime = FailingOnce(
        kafka_settings, RecordHandler(), name="test-rewind", group_id=group, topics=[topic]
    )
    try:
        with running(runtime):
            runtime.fail_next = True  # nothing commits before: the topic is empty
            runtime.rewind_to_start()  # done once the partitions are assigned
            assert runtime.rewound_to_start.wait(30)
            _until(lambda: check.committed(quiet) == 0, timeout_s=15)
            assert not runtime.fail_next  # the first commit did fail
    finally:
        check.close()
