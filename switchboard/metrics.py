"""Prometheus metrics of every stage, served at ``GET /metrics`` by each process.

prometheus-client is the reference client: its text exposition is what every
scraper reads, and its default registry also exports process metrics (memory,
CPU, open files) for free. The metric objects are module-level, as the client
intends; defining them connects to nothing. Label values are bounded sets
(adapter names, reasons, topics, partitions), never message data.
"""

from __future__ import annotations

import os
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

LOG_LINES_DROPPED = Counter(
    "switchboard_log_lines_dropped",
    "Log lines dropped because the log output was not read fast enough (switchboard.logs)",
)
RECEIVED = Counter(
    "switchboard_messages_received",
    "Inputs an adapter received (SMTP DATA, HTTP requests to a hook, fetched IMAP mail).",
    ["adapter"],
)
ACCEPTED = Counter(
    "switchboard_messages_accepted",
    "Messages made durable and acknowledged to the sender, by where they went.",
    ["adapter", "via"],
)
REJECTED = Counter(
    "switchboard_messages_rejected",
    "Inputs refused with an error answer to the sender, by reason.",
    ["adapter", "reason"],
)
DEAD_LETTERED = Counter(
    "switchboard_dead_letters",
    "Records written to the dead letter topic (or spooled for it), by stage and reason.",
    ["stage", "reason"],
)
SENDER_CHECKS = Counter(
    "switchboard_sender_checks",
    "SMTP sender authentication: where the verdict came from (local, authserv, none) and "
    "its DMARC result; a rise of temperror means the resolver is failing.",
    ["source", "dmarc"],
)
TOKENS_REUSED = Counter(
    "switchboard_tokens_reused",
    "Signed provider requests whose single-use token had already carried another "
    "message: taken without the provider's sender verdict (ingest.replay). Each one is "
    "a leaked signature or a stranger's copy that came first.",
    ["adapter"],
)
EVIDENCE_DROPPED = Counter(
    "switchboard_evidence_dropped",
    "Refused requests over the per-route evidence budget: counted, body not stored.",
    ["adapter"],
)
BLOBS_COLLECTED = Counter(
    "switchboard_blobs_collected",
    "Blobs `blobs gc` deleted (unreferenced and older than the retention).",
)
BLOB_TEMPORARIES_REMOVED = Counter(
    "switchboard_blob_temporaries_removed",
    "Temporary blob files of writes that died before their rename, removed by `blobs gc`.",
)
SPOOLED = Counter(
    "switchboard_spooled",
    "Events written to the local spool because Kafka did not acknowledge in time.",
)
SPOOL_DRAINED = Counter(
    "switchboard_spool_drained",
    "Spooled events Kafka acknowledged and the spool then deleted.",
)
# Under a supervisor (several workers on one port) each worker writes its values
# to files in PROMETHEUS_MULTIPROC_DIR and /metrics serves their sum.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
SPOOL_MESSAGES = Gauge(
    "switchboard_spool_messages",
    "Events waiting in the local spool (every worker's, under a supervisor).",
    multiprocess_mode="livesum",
)
SPOOL_BYTES = Gauge(
    "switchboard_spool_bytes",
    "Bytes of events waiting in the local spool (every worker's, under a supervisor).",
    multiprocess_mode="livesum",
)
# Every gauge has a live* multiprocess mode (ignored in a single process): under a
# supervisor a dead worker's values go with it instead of staying as a series of
# their own, labelled with its pid.
JOURNAL_MESSAGES = Gauge(
    "switchboard_journal_messages",
    "Accepted messages the local journal keeps until the queue has them (embedded broker).",
    multiprocess_mode="livesum",
)
JOURNAL_BYTES = Gauge(
    "switchboard_journal_bytes",
    "Bytes the local journal keeps (embedded broker).",
    multiprocess_mode="livesum",
)
JOURNAL_REPLAYED = Counter(
    "switchboard_journal_replayed",
    "Events published again at a recovery: inbound from the journal, routed from the outbox.",
    ["source"],
)
BROKER_RESTARTS = Counter(
    "switchboard_embedded_broker_restarts",
    "Times the embedded broker died under `switchboard run` and was started again, empty.",
)
PUBLISHED = Counter(
    "switchboard_events_published",
    "Events Kafka acknowledged, by topic.",
    ["topic"],
)
HANDOFF_SECONDS = Histogram(
    "switchboard_handoff_seconds",
    "Time to make a received message durable (blobs fsynced, Kafka ack or spool fsync).",
    ["adapter"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BLOB_GROUP_BLOBS = Histogram(
    "switchboard_blob_group_commit_blobs",
    "Blobs made durable together by one group commit (the blobs of concurrent messages).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ROUTER_DECISIONS = Counter(
    "switchboard_router_decisions",
    "Routing outcomes (routed, duplicate, unroutable, failed, replayed) and their reason.",
    ["result", "reason"],
)
ROUTER_STATEMENTS = Counter(
    "switchboard_router_sql_statements",
    "SQL statements the router sent to route its batches (reads, locks and writes).",
)
ROUTER_LOCK_SECONDS = Histogram(
    "switchboard_router_lock_seconds",
    "Per batch: time to take the batch's locks (advisory locks, contact rows, team "
    "cursors), waits for other routers included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ROUTER_ALL_KEYS_LOCKS = Counter(
    "switchboard_router_all_keys_locks",
    "Batches whose identity and dedupe keys were more than the lock budget (2,048): "
    "they locked out every other router for their transaction instead.",
)
ROUTER_RESTARTS = Counter(
    "switchboard_router_batch_restarts",
    "Batches routed again because another router merged one of their contacts meanwhile.",
)
CONSUMER_LAG = Gauge(
    "switchboard_consumer_lag",
    "Records not yet consumed, per consumer group and partition (high-water minus position).",
    ["group", "topic", "partition"],
    multiprocess_mode="livemax",
)
CONSUMER_RETRIES = Counter(
    "switchboard_consumer_retries",
    "Batches a consumer rewound and retried after an outage (database or broker away).",
    ["group"],
)
QUEUE_APPLIED = Counter(
    "switchboard_queue_events_applied",
    "Events the queue read model applied (replays not counted).",
    ["type"],
)
IMAP_CONNECTED = Gauge(
    "switchboard_imap_connected",
    "1 while the poller holds a working session to the mailbox, else 0.",
    ["mailbox"],
    multiprocess_mode="livemax",
)
IMAP_LAST_UID = Gauge(
    "switchboard_imap_last_uid",
    "Highest UID made durable, per mailbox.",
    ["mailbox"],
    multiprocess_mode="livemax",
)
IMAP_LAST_SUCCESS = Gauge(
    "switchboard_imap_last_success_timestamp_seconds",
    "When the mailbox was last polled successfully (Unix time).",
    ["mailbox"],
    multiprocess_mode="livemax",
)

HTTP_REFUSED = Counter(
    "switchboard_http_refused",
    "HTTP requests or connections refused by the server's limits before any route ran "
    "(body-too-large, body-timeout, connections, header-timeout, header-size, "
    "body-after-answer, pipelined, send-timeout, ...).",
    ["reason"],
)

_HTTP_REASONS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "unknown-hook",
    413: "too-large",
    415: "content-type",
    429: "rate-limited",
    503: "retry-later",
}


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Counter | Histogram, *labels: str) -> Any:  # noqa: ANN401 - a child
    """``metric.labels(*labels)``, looked up once: the client checks and locks on every
    ``labels()`` call, and the edges count each message in four metrics. For label
    values from a bounded set (see above), and for metrics nothing ``remove()``s from."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def http_rejected(adapter: str, status: int) -> None:
    """Count an HTTP adapter's error answer under a readable reason."""
    REJECTED.labels(adapter, _HTTP_REASONS.get(status, str(status))).inc()


def report_lag(group: str, consumer: KafkaConsumer) -> None:
    """Set the lag gauges from the consumer's own view; call it from the polling thread."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=0)
        except KafkaError:
            continue
        if position is not None:
            CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def exposition() -> tuple[bytes, str]:
    """The text /metrics serves: this process's metrics, or under a supervisor the
    sum of every worker's (prometheus-client's multiprocess collector; the process
    metrics, memory and CPU, are then not included: they are per process)."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
