"""Kafka ceilings on this machine: raw kafka-python produce/consume vs our Publisher.

Usage: .venv/bin/python bench/kafka_throughput.py [--messages N] [--size BYTES]

Starts its own embedded broker (Tansu, memory storage) unless
SWITCHBOARD_KAFKA_BOOTSTRAP is set. Reports messages per second for:
  raw-produce   kafka-python, acks=all, linger 20 ms, 256 KB batches, 1 KB values
  publisher     switchboard Publisher.publish_many in batches of 500 (CloudEvents)
  apublish      switchboard Publisher.apublish, 256 in flight (the ingest path)
  raw-consume   kafka-python consumer group reading everything back
The raw numbers are the ceilings later stages are measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer

from switchboard.broker import EmbeddedBroker
from switchboard.events import TYPE_INBOUND, Event
from switchboard.kafka import Publisher
from switchboard.settings import KafkaSettings
from switchboard.topics import ensure_topics
from tests.factories import inbound_message


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} msg/s  ({n} in {seconds:.2f}s)"


def raw_produce(settings: KafkaSettings, topic: str, n: int, size: int) -> float:
    producer = KafkaProducer(
        acks="all", linger_ms=20, batch_size=262_144, **settings.client_config()
    )
    value = os.urandom(size // 2).hex().encode()
    started = time.perf_counter()
    futures = [producer.send(topic, key=str(i % 100).encode(), value=value) for i in range(n)]
    producer.flush()
    for future in futures:
        future.get(0)
    took = time.perf_counter() - started
    producer.close()
    return took


def raw_consume(settings: KafkaSettings, topic: str, n: int) -> float:
    consumer = KafkaConsumer(
        topic,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        max_poll_records=5000,
        **settings.client_config(),
    )
    while not consumer.assignment():
        consumer.poll(timeout_ms=1500)
        if consumer.assignment():
            consumer.seek_to_beginning()
    seen = 0
    started = time.perf_counter()
    while seen < n:
        for batch in consumer.poll(timeout_ms=1500).values():
            seen += len(batch)
    took = time.perf_counter() - started
    consumer.close()
    return took


def publisher_batches(settings: KafkaSettings, topic: str, n: int) -> float:
    publisher = Publisher(settings)
    message = inbound_message()
    events = [
        Event(type=TYPE_INBOUND, source="/bench", key=message.partition_key, data=message)
        for _ in range(n)
    ]
    started = time.perf_counter()
    for i in range(0, n, 500):
        publisher.publish_many([(topic, e) for e in events[i : i + 500]], timeout_s=30)
    took = time.perf_counter() - started
    publisher.close()
    return took


def publisher_async(settings: KafkaSettings, topic: str, n: int, in_flight: int = 256) -> float:
    publisher = Publisher(settings)
    message = inbound_message()

    async def main() -> float:
        gate = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with gate:
                await publisher.apublish(
                    topic,
                    Event(
                        type=TYPE_INBOUND, source="/bench", key=message.partition_key, data=message
                    ),
                    timeout_s=30,
                )

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - started

    took = asyncio.run(main())
    publisher.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    broker = None
    bootstrap = os.environ.get("SWITCHBOARD_KAFKA_BOOTSTRAP")
    if not bootstrap:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap
    settings = KafkaSettings(bootstrap=bootstrap, partitions=3)
    run = uuid.uuid4().hex[:8]
    topics = (f"bench-raw-{run}", f"bench-pub-{run}", f"bench-async-{run}")
    ensure_topics(settings, topics)
    try:
        n = args.messages
        print(f"kafka throughput, {n} messages, {args.size} B raw values, broker {bootstrap}")
        print("raw-produce ", _rate(n, raw_produce(settings, topics[0], n, args.size)))
        print("raw-consume ", _rate(n, raw_consume(settings, topics[0], n)))
        size = len(inbound_message().model_dump_json())
        print(f"(InboundMessage events are {size} B of JSON)")
        print("publisher   ", _rate(n, publisher_batches(settings, topics[1], n)))
        m = min(n, 20_000)
        print("apublish    ", _rate(m, publisher_async(settings, topics[2], m)))
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
