"""The archive sink's throughput against raw kafka-python consume, and its size.

Usage: PYTHONPATH=. .venv/bin/python bench/archive.py [--messages N]

Starts its own embedded broker (Tansu, memory storage), publishes N inbound
message events (CloudEvents, about 1.3 KB each, as ingest publishes them) to
switchboard.inbound.v1, then reads them back twice, each time as a new consumer
group from the earliest offset:

  raw-consume   kafka-python alone, the ceiling (the same records, nothing done)
  archive       the archive sink (ArchiveSink on the consumer runtime): rows,
                Parquet (zstd), temporary file, fsync, rename, commit; timed
                until every record is converted (all files but the last
                buffers' written), then until the last buffers are written too

Both include the group join. Reports events per second, the ratio, and the size
of the archive next to the size of the values on the wire (one day's worth when
N is a day's traffic).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer

from sinks.archive import ArchiveSink
from sinks.archive_files import LocalArchive
from switchboard.broker import EmbeddedBroker
from switchboard.events import TYPE_INBOUND, Event
from switchboard.kafka import Publisher
from switchboard.settings import ArchiveSettings, KafkaSettings
from switchboard.topics import INBOUND, ensure_topics
from tests.factories import inbound_message


def publish(settings: KafkaSettings, n: int) -> int:
    publisher = Publisher(settings)
    size = 0
    try:
        for start in range(0, n, 1000):
            events = [
                Event(type=TYPE_INBOUND, source="bench", key=f"email:{i}", data=inbound_message())
                for i in range(start, min(n, start + 1000))
            ]
            size += sum(len(e.value()) for e in events)
            publisher.publish_many([(INBOUND, e) for e in events])
    finally:
        publisher.close()
    return size


def raw_consume(settings: KafkaSettings, n: int) -> float:
    consumer = KafkaConsumer(
        INBOUND,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        max_poll_records=2000,  # as the archive sink polls
        **settings.client_config(),
    )
    started = time.perf_counter()
    seen = 0
    while seen < n:
        for batch in consumer.poll(timeout_ms=1500).values():
            seen += len(batch)
    took = time.perf_counter() - started
    consumer.close()
    return took


def archive(settings: KafkaSettings, n: int, root: Path) -> tuple[float, float]:
    """(seconds until every record is read and converted, seconds until every row
    is in a file). The difference is the last buffers' wait: they are written at
    the first empty poll (1.5 s) once older than roll_s, a latency the settings
    choose (production: roll_s 300 s), not work per record."""
    # Default roll size; a short roll time so the last file is written once all are in.
    config = ArchiveSettings(roll_s=1.0)
    sink = ArchiveSink(settings, LocalArchive(root), config, group_id=f"bench-{uuid.uuid4().hex}")
    thread = threading.Thread(target=sink.run_forever, daemon=True)
    handler = sink.archive_handler
    started = time.perf_counter()
    thread.start()
    try:
        while handler.buffered < n:
            time.sleep(0.01)
        converted = time.perf_counter() - started
        while handler.rows < n:
            time.sleep(0.01)
        return converted, time.perf_counter() - started
    finally:
        sink.request_stop()
        thread.join(15)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    n = parser.parse_args().messages
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, partitions=3)
        ensure_topics(settings)
        wire = publish(settings, n)
        raw = raw_consume(settings, n)
        with tempfile.TemporaryDirectory() as tmp:
            took, durable = archive(settings, n, Path(tmp))
            files = list(Path(tmp).glob("topic=*/date=*/part-*.parquet"))
            size = sum(f.stat().st_size for f in files)
    print(f"raw-consume {n / raw:>10,.0f} events/s  ({n} in {raw:.2f}s)")
    print(
        f"archive     {n / took:>10,.0f} events/s  "
        f"({n} read and converted, all but the last buffers in files, in {took:.2f}s)"
    )
    print(f"ratio       {raw / took:.0%} of raw consume (goal: 50% or more)")
    print(
        f"durable     {n / durable:>10,.0f} events/s  (all {n} in files after {durable:.2f}s: "
        f"the last buffers wait for an empty poll and roll_s)"
    )
    print(
        f"size        {size / 1e6:.1f} MB in {len(files)} Parquet files for {n} events "
        f"({size / n:.0f} B/event); values on the wire {wire / 1e6:.1f} MB "
        f"({wire / n:.0f} B/event)"
    )


if __name__ == "__main__":
    main()
