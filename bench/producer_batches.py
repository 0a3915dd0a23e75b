"""What one produce request costs kafka-python's network thread, by records per request.

Usage: PYTHONPATH=. .venv/bin/python bench/producer_batches.py [--sizes 1,4,16,64]
                                        [--records 6000] [--kafka-metrics on|off|both]

Starts the embedded broker, builds a producer as every Publisher does
(``switchboard.kafka.new_producer``, an edge's linger), then for each size K sends K
records of 1.4 KB with the CloudEvents headers of an inbound event to one partition
and waits for their acknowledgements, over and over. Prints the CPU the process's
other threads (the producer's network thread) spent per produce request and per
record, and the sending thread's CPU per record. ``--kafka-metrics on`` builds the
producer with kafka-python's own metrics, as before 2026-12-02.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from switchboard.bootstrap import producer_settings
from switchboard.broker import EmbeddedBroker
from switchboard.config import KafkaSettings
from switchboard.kafka import new_producer
from switchboard.topics import INBOUND, ensure_topics

VALUE = json.dumps({"text": "a" * 1400}).encode()
HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"0190c9a2-8d0e-7cc1-9a2f-1b2c3d4e5f60"),
    ("ce_type", b"switchboard.inbound.v1"),
    ("ce_source", b"/switchboard/ingest/twilio"),
    ("ce_time", b"2026-12-02T16:48:32.837000+00:00"),
    ("content-type", b"application/json"),
    ("ce_subject", b"0190c9a2-8d0e-7cc1-9a2f-1b2c3d4e5f60"),
]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(settings: KafkaSettings, sizes: list[int], records: int, metrics: bool) -> None:
    # With metrics: the producer as before 2026-12-02, kafka-python's metrics on.
    producer: Any = _with_metrics(settings) if metrics else new_producer(settings, "bench")
    try:
        producer.send(INBOUND, key=b"warm", value=VALUE, headers=HEADERS).get(10)
        for size in sizes:
            rounds = max(records // size, 50)
            cpu, own, wall = _cpu(), time.thread_time(), time.perf_counter()
            for _ in range(rounds):
                sent = [
                    producer.send(INBOUND, key=b"k", value=VALUE, headers=HEADERS, partition=0)
                    for _ in range(size)
                ]
                for future in sent:
                    future.get(10)
            cpu, own = _cpu() - cpu, time.thread_time() - own
            wall = time.perf_counter() - wall
            network = cpu - own
            print(
                f"kafka metrics {'on ' if metrics else 'off'} K={size:3d}: network thread "
                f"{1e6 * network / rounds:6.0f} µs a produce request "
                f"({1e6 * network / rounds / size:6.1f} a record), sender "
                f"{1e6 * own / rounds / size:6.1f} µs a record, {1e3 * wall / rounds:.2f} ms "
                "a request"
            )
    finally:
        producer.close(timeout=1)


def _with_metrics(settings: KafkaSettings) -> Any:  # noqa: ANN401 - kafka-python's
    from switchboard.kafka import KeyPartitioner, _Producer  # noqa: PLC0415 - bench only

    return _Producer(
        client_id="bench-producer-batches-metrics",
        acks="all",
        enable_idempotence=True,
        partitioner=KeyPartitioner(),
        linger_ms=settings.linger_ms,
        batch_size=settings.batch_size,
        max_request_size=settings.max_request_size,
        **settings.client_config(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--kafka-metrics", choices=("on", "off", "both"), default="both")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with EmbeddedBroker().start() as broker:
        settings = producer_settings(KafkaSettings(bootstrap=broker.bootstrap), frozenset({"http"}))
        ensure_topics(settings)
        for metrics in {"on": [True], "off": [False], "both": [False, True]}[args.kafka_metrics]:
            measure(settings, sizes, args.records, metrics)


if __name__ == "__main__":
    main()
