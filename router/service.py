"""The router process: a consumer group on ``switchboard.inbound.v1``.

Per poll: parse the batch, route it in one database transaction
(:meth:`RouterStore.route_batch`), publish every event it produced and wait for
the broker's acknowledgements, and only then commit the offsets. A crash at any
point re-delivers the batch; the store replays recorded events with their ids,
so the re-delivery changes nothing and re-emits the same events.

If the database or the broker fails, the consumer seeks back to the first
record of the batch and tries again after a back-off, polling meanwhile so it
keeps its group membership.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from normalize.schema import DeadLetter, InboundMessage
from router.store import RouterStore, is_transient, topic_of
from switchboard.events import (
    TYPE_DEADLETTER,
    TYPE_INBOUND,
    EnvelopeError,
    Event,
    read_data,
    read_meta,
)
from switchboard.kafka import Publisher, PublishError, make_consumer
from switchboard.metrics import DEAD_LETTERED, ROUTER_DECISIONS, report_lag
from switchboard.runtime import ThreadedComponent
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND

log = logging.getLogger(__name__)

GROUP = "switchboard-router"
_RECORD_NAMESPACE = uuid.UUID("0b7a3f7e-4a8c-5d0e-9a61-3c2f8e1d5b47")


@dataclass
class RouterStats:
    """Counters for status output and tests."""

    batches: int = 0
    retries: int = 0
    results: Counter[str] = field(default_factory=Counter)
    last_commit: float | None = None


def _bad_record(record: object, error: EnvelopeError) -> Event:
    """A dead letter for a record that is not a valid inbound event; its id is
    derived from the record's coordinates, so a redelivery re-emits the same one."""
    topic = getattr(record, "topic", INBOUND)
    partition = getattr(record, "partition", -1)
    offset = getattr(record, "offset", -1)
    letter_id = uuid.uuid5(_RECORD_NAMESPACE, f"{topic}/{partition}/{offset}")
    letter = DeadLetter(
        id=letter_id,
        stage="router",
        reason=f"envelope-{error.reason}",
        detail=error.detail[:4000],
        occurred_at=datetime.now(UTC),
        metadata={"topic": topic, "partition": partition, "offset": offset},
    )
    key = getattr(record, "key", None)
    return Event(
        type=TYPE_DEADLETTER,
        source="switchboard/router",
        key=key.decode(errors="replace") if isinstance(key, bytes) else "unknown",
        data=letter,
        id=str(letter_id),
    )


def parse(record: object) -> InboundMessage:
    meta = read_meta(getattr(record, "headers", None))
    if meta.type != TYPE_INBOUND:
        raise EnvelopeError("type", f"unexpected event type {meta.type!r}")
    return read_data(getattr(record, "value", None), InboundMessage)


class Router(ThreadedComponent):
    """The routing loop in a thread (kafka-python is blocking), as a runtime component."""

    name = "router"

    def __init__(
        self,
        kafka: KafkaSettings,
        store: RouterStore,
        publisher: Publisher,
        *,
        group_id: str = GROUP,
        max_batch: int = 500,
        purge_every_s: float = 3600.0,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.publisher = publisher
        self.group_id = group_id
        self.max_batch = max_batch
        self.purge_every_s = purge_every_s
        super().__init__()
        self.stats = RouterStats()

    def prepare(self) -> None:
        self.store.sync_owners()

    # -- loop ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            consumer = make_consumer(
                self.kafka,
                group_id=self.group_id,
                topics=[INBOUND],
                max_poll_records=self.max_batch,
            )
        except BaseException as exc:
            self.start_error = exc
            log.exception("router could not connect to Kafka")
            return
        self._ready.set()
        next_purge = time.monotonic()
        backoff = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.purge_every_s
                    self._purge()
                try:
                    polled = consumer.poll(timeout_ms=self.kafka.poll_timeout_ms)
                except KafkaError as exc:
                    log.warning("poll failed; retrying", extra={"error": repr(exc)[:500]})
                    self._stop.wait(1.0)
                    continue
                report_lag(self.group_id, consumer)
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    self._relay_pending()
                    continue
                if self._handle(consumer, records):
                    backoff = 0.0
                else:
                    self.stats.retries += 1
                    backoff = min(5.0, max(0.2, backoff * 2))
                    self._stop.wait(backoff)
        finally:
            try:
                consumer.close(autocommit=False)
            except Exception:
                log.warning("router consumer did not close cleanly", exc_info=True)

    def _handle(self, consumer: KafkaConsumer, records: list[object]) -> bool:
        """Route, publish, commit one polled batch. False: rewound, try again."""
        firsts: dict[TopicPartition, int] = {}
        lasts: dict[TopicPartition, int] = {}
        messages: list[InboundMessage] = []
        bad: list[Event] = []
        for record in records:
            tp = TopicPartition(getattr(record, "topic"), getattr(record, "partition"))  # noqa: B009
            offset = int(getattr(record, "offset"))  # noqa: B009
            firsts.setdefault(tp, offset)
            lasts[tp] = offset
            try:
                messages.append(parse(record))
            except EnvelopeError as exc:
                log.warning(
                    "record is not a valid inbound event; dead-lettered",
                    extra={"reason": exc.reason, "partition": tp.partition, "offset": offset},
                )
                bad.append(_bad_record(record, exc))
        try:
            outcomes = self.store.route_batch(messages) if messages else []
        except Exception as exc:
            if is_transient(exc):
                log.warning("routing batch will be retried", extra={"error": repr(exc)[:500]})
            else:
                # Not one message's fault (those are dead-lettered inside): keep the
                # records, keep the thread alive, and say so loudly.
                log.exception("routing batch failed; it will be retried")
            self._rewind(consumer, firsts)
            return False
        events = [e for o in outcomes for e in o.events] + bad
        try:
            if events:
                self.publisher.publish_many([(topic_of(e), e) for e in events])
        except PublishError as exc:
            log.warning("routed events not acknowledged; retrying", extra={"error": str(exc)})
            self._rewind(consumer, firsts)
            return False
        try:
            consumer.commit({tp: OffsetAndMetadata(last + 1, "", -1) for tp, last in lasts.items()})
            self.stats.last_commit = time.time()
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced: another member re-delivers these records, and
            # replays the same events. Nothing is lost or doubled in the directory.
            log.warning(
                "offset commit failed; records will be redelivered", extra={"error": repr(exc)}
            )
        self.stats.batches += 1
        for outcome in outcomes:
            self.stats.results[outcome.result] += 1
            ROUTER_DECISIONS.labels(outcome.result, outcome.reason or outcome.result).inc()
            if outcome.result == "failed":
                DEAD_LETTERED.labels("router", "routing-failed").inc()
        if bad:
            ROUTER_DECISIONS.labels("bad-record", "envelope").inc(len(bad))
            DEAD_LETTERED.labels("router", "envelope").inc(len(bad))
        self.stats.results["bad-record"] += len(bad)
        return True

    def _rewind(self, consumer: KafkaConsumer, firsts: dict[TopicPartition, int]) -> None:
        for tp, offset in firsts.items():
            # Not assigned any more: its new owner starts from the committed offset.
            with contextlib.suppress(AssertionError, KafkaError, ValueError):
                consumer.seek(tp, offset)

    def _relay_pending(self) -> None:
        try:
            pending = self.store.pending()
            if pending:
                self.publisher.publish_many([(topic_of(e), e) for e in pending])
                self.store.mark_published([e.id for e in pending])
                log.info("published pending events", extra={"count": len(pending)})
        except Exception as exc:  # noqa: BLE001 - retried on the next idle poll
            log.warning("pending events not published yet", extra={"error": repr(exc)[:500]})

    def _purge(self) -> None:
        try:
            keys, events = self.store.purge()
            if keys or events:
                log.info(
                    "purged expired dedupe keys and events", extra={"keys": keys, "events": events}
                )
        except Exception as exc:  # noqa: BLE001 - retried at the next purge
            log.warning("purge failed", extra={"error": repr(exc)[:500]})
