"""The Kafka backbone against the real embedded broker (Tansu)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from normalize.schema import InboundMessage
from sinks.archive import ArchiveSink
from sinks.archive_files import LocalArchive
from switchboard.broker import EmbeddedBroker, free_port
from switchboard.events import TYPE_INBOUND, Event, read_data, read_meta
from switchboard.kafka import Publisher, PublishError, make_consumer, probe_broker
from switchboard.settings import ArchiveSettings, KafkaSettings
from switchboard.topics import ALL_TOPICS, INBOUND, ensure_topics
from tests.factories import inbound_message
from tests.kafka_helpers import consume_until

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def longest_stall() -> AsyncIterator[list[float]]:
    """The longest the event loop went without running a 20 ms ticker, in seconds,
    over the ``async with`` block (in the yielded list's one item, set on exit)."""
    loop = asyncio.get_running_loop()
    worst = [0.0]
    last, stop = loop.time(), False

    async def ticker() -> None:
        nonlocal last
        while not stop:
            await asyncio.sleep(0.02)
            worst[0], last = max(worst[0], loop.time() - last), loop.time()

    tick = asyncio.create_task(ticker())
    try:
        yield worst
    finally:
        stop = True
        await tick


def _event(message: InboundMessage) -> Event:
    return Event(type=TYPE_INBOUND, source="/test", key=message.partition_key, data=message)


def test_round_trip_through_a_consumer_group(kafka_settings: KafkaSettings, unique: str) -> None:
    message = inbound_message()
    event = _event(message)
    publisher = Publisher(kafka_settings)
    try:
        ack = publisher.publish(INBOUND, event)
    finally:
        publisher.close()
    assert ack.topic == INBOUND
    assert ack.offset >= 0

    consumer = make_consumer(kafka_settings, group_id=f"rt-{unique}", topics=[INBOUND])
    try:
        records = consume_until(
            consumer, lambda rs: any(read_meta(r.headers).id == event.id for r in rs)
        )
    finally:
        consumer.close()
    [record] = [r for r in records if read_meta(r.headers).id == event.id]
    assert record.key == b"email:alice@example.com"
    headers = dict(record.headers)
    for name in ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"):
        assert name in headers
    meta = read_meta(record.headers)
    assert meta.type == TYPE_INBOUND
    assert read_data(record.value, InboundMessage) == message


def test_async_publish_is_acknowledged(kafka_settings: KafkaSettings) -> None:
    publisher = Publisher(kafka_settings)

    async def publish_many() -> list[int]:
        acks = await asyncio.gather(
            *(publisher.apublish(INBOUND, _event(inbound_message())) for _ in range(50))
        )
        return [a.offset for a in acks]

    try:
        offsets = asyncio.run(publish_many())
    finally:
        publisher.close()
    assert len(offsets) == 50
    assert all(o >= 0 for o in offsets)


def test_async_publish_takes_no_thread_once_the_topic_is_known(
    kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first record of a topic may wait for the producer and its metadata, off
    the event loop; the next ones are appended on the loop itself."""
    publisher = Publisher(kafka_settings)
    hops: list[object] = []
    submit = publisher._send_thread.submit

    def counted(*args: object, **kwargs: object) -> object:
        hops.append(args[0])
        return submit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(publisher._send_thread, "submit", counted)

    async def scenario() -> tuple[int, list[int]]:
        await publisher.apublish(INBOUND, _event(inbound_message()))
        first = len(hops)
        acks = await asyncio.gather(
            *(publisher.apublish(INBOUND, _event(inbound_message())) for _ in range(50))
        )
        return first, [a.offset for a in acks]

    try:
        first, offsets = asyncio.run(scenario())
    finally:
        publisher.close()
    assert first == 1  # no producer yet: built on the send thread
    assert len(hops) == 1, f"{len(hops) - 1} of 50 sends hopped to the thread"
    assert len(set(offsets)) == 50
    assert all(o >= 0 for o in offsets)


def test_a_topic_gone_between_the_check_and_the_send_does_not_freeze_the_loop(
    kafka_settings: KafkaSettings,
) -> None:
    """The producer knows the topic when apublish looks, and has lost it when send()
    looks (its I/O thread replaced the topic table in between): send() would wait
    for metadata on the event loop. The wait goes to the send thread instead."""
    publisher = Publisher(kafka_settings)
    loop_thread = threading.get_ident()

    async def scenario() -> tuple[float, int]:
        await publisher.apublish(INBOUND, _event(inbound_message()))  # topic known now
        producer = publisher._ready(INBOUND)
        assert producer is not None
        metadata = producer._metadata
        real = metadata.partitions_for_topic
        state = {"checks": 0, "hidden_until": 0.0}

        def flaky(topic: str) -> object:
            if topic != INBOUND:
                return real(topic)
            if threading.get_ident() == loop_thread:
                state["checks"] += 1
                if state["checks"] == 1:
                    return real(topic)  # apublish's look
                if not state["hidden_until"]:
                    state["hidden_until"] = time.monotonic() + 1.5
            if time.monotonic() < state["hidden_until"]:
                return None  # send()'s look, and for 1.5 s everyone's
            return real(topic)

        metadata.partitions_for_topic = flaky
        try:
            async with longest_stall() as worst:
                ack = await publisher.apublish(INBOUND, _event(inbound_message()), timeout_s=10)
        finally:
            metadata.partitions_for_topic = real
        return worst[0], ack.offset

    try:
        worst, offset = asyncio.run(scenario())
    finally:
        publisher.close()
    assert offset >= 0
    assert worst < 0.5, f"the event loop stalled for {worst:.1f} s"


def test_a_partitioner_error_is_a_publish_error(kafka_settings: KafkaSettings) -> None:
    """kafka-python's partitioner raises ValueError or KeyError when a topic's
    partitions change under it; callers handle PublishError (spool, retry) only."""
    publisher = Publisher(kafka_settings)
    try:
        publisher.publish(INBOUND, _event(inbound_message()))
        producer = publisher._ready(INBOUND)
        assert producer is not None
        real = producer._partition

        def racing(*args: object, **kwargs: object) -> object:
            raise ValueError("Partitioner did not assign a partition")

        producer._partition = racing
        with pytest.raises(PublishError, match="did not assign"):
            asyncio.run(publisher.apublish(INBOUND, _event(inbound_message())))
        with pytest.raises(PublishError, match="did not assign"):
            publisher.publish(INBOUND, _event(inbound_message()))
        producer._partition = real
        # The producer was kept, and works.
        assert publisher._ready(INBOUND) is producer
        assert publisher.publish(INBOUND, _event(inbound_message())).offset >= 0
    finally:
        publisher.close()


def test_consumer_group_joins_in_under_three_seconds(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    started = time.monotonic()
    consumer = make_consumer(kafka_settings, group_id=f"join-{unique}", topics=[INBOUND])
    try:
        while not consumer.assignment() and time.monotonic() - started < 10:
            consumer.poll(timeout_ms=kafka_settings.poll_timeout_ms)
        joined_after = time.monotonic() - started
        assert consumer.assignment(), "consumer never joined its group"
    finally:
        consumer.close()
    assert joined_after < 3.0, f"group join took {joined_after:.2f}s"


def test_topics_are_created_once_with_the_configured_partitions(
    kafka_broker: EmbeddedBroker, unique: str
) -> None:
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap, partitions=5)
    topics = (f"a-{unique}", f"b-{unique}")
    first = ensure_topics(settings, topics)
    again = ensure_topics(settings, topics)
    assert first.created == topics
    assert again.created == ()
    assert again.existing == topics
    consumer = make_consumer(settings, group_id=f"p-{unique}", topics=list(topics))
    try:
        assert consumer.partitions_for_topic(topics[0]) == set(range(5))
    finally:
        consumer.close()


def test_producer_is_recreated_after_a_broker_restart() -> None:
    port = free_port()
    settings = KafkaSettings(
        bootstrap=f"127.0.0.1:{port}", max_block_ms=1500, request_timeout_ms=1500
    )
    broker = EmbeddedBroker(port=port).start()
    publisher = Publisher(settings, on_new_producer=lambda: ensure_topics(settings, wait_s=5))
    try:
        ensure_topics(settings)
        publisher.publish(INBOUND, _event(inbound_message()))
        assert publisher.producers_built == 1

        broker.stop()
        started = time.monotonic()
        with pytest.raises(PublishError):
            publisher.publish(INBOUND, _event(inbound_message()), timeout_s=3)
        assert time.monotonic() - started < 8, "a publish with the broker away must be bounded"

        broker = EmbeddedBroker(port=port).start()  # memory storage: topics are gone too
        ack = publisher.publish(INBOUND, _event(inbound_message()), timeout_s=15)
        assert ack.offset >= 0
        assert publisher.producers_built >= 2
        # ...and it keeps working afterwards.
        publisher.publish(INBOUND, _event(inbound_message()))
    finally:
        publisher.close(timeout_s=1)
        broker.stop()


def test_the_event_loop_keeps_running_while_a_producer_is_rebuilt() -> None:
    """While the broker is away, rebuilding the producer blocks its thread for
    max_block_ms; hand-offs timing out meanwhile must not block the event loop
    (they did: an SMTP server froze for 9 s, every session with it)."""
    port = free_port()
    settings = KafkaSettings(bootstrap=f"127.0.0.1:{port}", max_block_ms=4000)
    broker = EmbeddedBroker(port=port).start()
    publisher = Publisher(settings, on_new_producer=lambda: ensure_topics(settings, wait_s=2))
    try:
        ensure_topics(settings)
        publisher.publish(INBOUND, _event(inbound_message()))
        broker.stop()

        async def scenario() -> tuple[float, list[BaseException | object]]:
            outcomes: list[BaseException | object] = []
            async with longest_stall() as worst:
                # Hand-offs arriving every 100 ms, as from SMTP sessions: early ones wait
                # for acknowledgements from the dead producer while later ones make the
                # send thread build a new one.
                wave = []
                for _ in range(20):
                    wave.append(
                        asyncio.ensure_future(
                            publisher.apublish(INBOUND, _event(inbound_message()), timeout_s=0.5)
                        )
                    )
                    await asyncio.sleep(0.1)
                outcomes += await asyncio.gather(*wave, return_exceptions=True)
            return worst[0], outcomes

        worst, outcomes = asyncio.run(scenario())
        assert all(isinstance(o, PublishError) for o in outcomes), outcomes
        assert worst < 1.0, f"the event loop stalled for {worst:.1f} s"
    finally:
        publisher.close(timeout_s=0)


def test_readiness_probe_speaks_kafka(kafka_settings: KafkaSettings) -> None:
    probe_broker(kafka_settings)
    closed = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="no Kafka broker answered"):
        probe_broker(closed, timeout_s=0.5)


def test_all_topics_exist_after_ensure(kafka_settings: KafkaSettings, unique: str) -> None:
    consumer = make_consumer(kafka_settings, group_id=f"t-{unique}", topics=[INBOUND])
    try:
        assert set(ALL_TOPICS) <= consumer.topics()
    finally:
        consumer.close()


def test_consumers_take_the_fetch_wait_from_the_settings(
    kafka_broker: EmbeddedBroker, unique: str
) -> None:
    """Tansu holds a fetch that found nothing for the whole wait, even when records
    arrive meanwhile: the setting bounds each consumer hop's latency there."""
    assert KafkaSettings().fetch_max_wait_ms == 100  # the default (kafka-python's: 500)
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap, fetch_max_wait_ms=250)
    ensure_topics(settings)
    consumer = make_consumer(settings, group_id=f"fw-{unique}", topics=[INBOUND])
    publisher = Publisher(settings)
    try:
        assert consumer.config["fetch_max_wait_ms"] == 250
        event = _event(inbound_message())
        publisher.publish(INBOUND, event)
        records = consume_until(consumer, lambda seen: any(r.value == event.value() for r in seen))
        assert any(r.value == event.value() for r in records)
    finally:
        publisher.close()
        consumer.close()


def test_the_archive_waits_longer_per_fetch_than_the_latency_bound_consumers(
    kafka_broker: EmbeddedBroker, tmp_path: Path, unique: str
) -> None:
    """The archive writes a file every roll_s: its fetches (every partition of every
    topic) wait 1 s, not the router's 100 ms, for a third less idle CPU."""
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    sink = ArchiveSink(settings, LocalArchive(tmp_path), ArchiveSettings())
    assert settings.fetch_max_wait_ms == 100
    consumer = make_consumer(sink.kafka, group_id=f"archive-fw-{unique}", topics=[INBOUND])
    try:
        assert consumer.config["fetch_max_wait_ms"] == 1000
    finally:
        consumer.close()
    tuned = ArchiveSink(settings, LocalArchive(tmp_path), ArchiveSettings(fetch_max_wait_ms=300))
    assert tuned.kafka.fetch_max_wait_ms == 300


def test_records_land_on_the_partition_kafka_python_s_default_picks(
    kafka_settings: KafkaSettings,
) -> None:
    """Against the broker: the partition each acknowledgement names is the one
    kafka-python's default partitioner gives the key, for many senders."""
    from kafka.partitioner.default import DefaultPartitioner  # noqa: PLC0415

    publisher = Publisher(kafka_settings)
    try:
        publisher.publish(INBOUND, _event(inbound_message()))
        producer = publisher._ready(INBOUND)
        assert producer is not None
        default = DefaultPartitioner()
        seen = set()
        for n in range(60):
            message = inbound_message()
            event = Event(
                type=TYPE_INBOUND, source="/test", key=f"phone:+1415555{n:04d}", data=message
            )
            ack = asyncio.run(publisher.apublish(INBOUND, event))
            key = event.key.encode()
            assert ack.partition == default.partition(
                INBOUND, None, key, None, None, producer._metadata
            )
            seen.add(ack.partition)
        assert seen == set(range(kafka_settings.partitions))  # the keys did spread
    finally:
        publisher.close()
