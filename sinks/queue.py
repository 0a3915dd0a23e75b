"""The unified queue: a read model built only from the routed and contacts topics.

Never reads the router's tables, so it can live in its own database and be
rebuilt by replaying the topics (``switchboard sink queue --rebuild``). Every
event is applied at most once: its id goes into ``queue_applied`` in the same
transaction as its effect, and a redelivered or replayed event is skipped.

Events can arrive in any order across the two topics (they are keyed by
contact, and a merge changes the key): a message of a contact that was merged
meanwhile lands on the survivor, and an owner change only wins over a newer one
if it is newer itself (``owner_at``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.structs import TopicPartition
from sqlalchemy import Engine

from sinks.customers import CustomerReader
from sinks.queue_apply import QueueWriter
from sinks.queue_read import BadCursor, NotFound, Page, QueueReader
from sinks.queue_tables import (
    TABLES,
    applied,
    metadata,
    q_attachments,
    q_contacts,
    q_conversations,
    q_identities,
    q_messages,
)
from switchboard.config import ConsumerSettings, KafkaSettings
from switchboard.consumer import ConsumerRuntime, PoisonRecord, RecordHandler
from switchboard.events import EnvelopeError, Event, read_meta
from switchboard.kafka import Publisher
from switchboard.metrics import QUEUE_APPLIED
from switchboard.topics import CONTACTS, ROUTED

__all__ = [
    "GROUP",
    "TABLES",
    "BadCursor",
    "NotFound",
    "Page",
    "QueueHandler",
    "QueueSink",
    "QueueStore",
    "applied",
    "metadata",
    "q_attachments",
    "q_contacts",
    "q_conversations",
    "q_identities",
    "q_messages",
]

log = logging.getLogger(__name__)

GROUP = "switchboard-queue"


class QueueStore(QueueWriter, CustomerReader):
    """The read model: applies events (:class:`QueueWriter`) and answers the API
    (:class:`CustomerReader`, :class:`QueueReader`) over one engine."""

    def __init__(self, engine: Engine, teams: dict[str, Sequence[str]] | None = None) -> None:
        QueueReader.__init__(self, engine, teams)


class _FromStart(ConsumerRebalanceListener):  # type: ignore[misc]
    """For --rebuild: the first assignment starts at the earliest offsets."""

    def __init__(self) -> None:
        self.consumer: KafkaConsumer | None = None
        self.done: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: object) -> None:
        pass

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self.done]
        if fresh and self.consumer is not None:
            self.consumer.seek_to_beginning(*fresh)
            self.done.update(fresh)


class QueueHandler(RecordHandler):
    """Apply each record to the read model (one transaction each, skipped when its
    event id was applied before); the consumer runtime commits and retries."""

    stage = "sink"

    def __init__(self, store: QueueStore, *, rebuild: bool) -> None:
        self.store = store
        self.rebuild = rebuild
        self.applied = 0
        self.skipped = 0

    def prepare(self) -> None:
        if self.rebuild:
            self.store.reset()
            log.warning("queue read model emptied; rebuilding from the earliest offsets")

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        """The poll in one transaction (:meth:`QueueWriter.apply_many`); a record that
        cannot be read fails the poll, and the runtime isolates it."""
        events: list[tuple[str, str, bytes | None]] = []
        for record in records:
            try:
                meta = read_meta(record.headers)
                UUID(meta.id)
            except EnvelopeError as exc:
                raise PoisonRecord(f"envelope-{exc.reason}", exc.detail) from exc
            except ValueError as exc:
                raise PoisonRecord("envelope-id", f"ce_id {meta.id!r} is not a UUID") from exc
            events.append((meta.type, meta.id, record.value))
        try:
            done = self.store.apply_many(events)
        except EnvelopeError as exc:
            raise PoisonRecord(f"envelope-{exc.reason}", exc.detail) from exc
        for (event_type, _, _), was_applied in zip(events, done, strict=True):
            if was_applied:
                QUEUE_APPLIED.labels(event_type).inc()
        self.applied += sum(done)
        self.skipped += len(done) - sum(done)
        return []


class QueueSink(ConsumerRuntime):
    """The queue read model's consumer: :class:`QueueHandler` on the consumer runtime."""

    def __init__(
        self,
        kafka: KafkaSettings,
        store: QueueStore,
        *,
        group_id: str = GROUP,
        rebuild: bool = False,
        publisher: Publisher | None = None,
        policy: ConsumerSettings | None = None,
    ) -> None:
        self.store = store
        self.rebuild = rebuild
        self.queue = QueueHandler(store, rebuild=rebuild)
        self._from_start = _FromStart() if rebuild else None
        super().__init__(
            kafka,
            self.queue,
            name="queue-sink",
            group_id=group_id,
            topics=[ROUTED, CONTACTS],
            publisher=publisher,
            policy=policy,
            listener=self._from_start,
        )

    def connected(self, consumer: KafkaConsumer) -> None:
        if self._from_start is not None:
            self._from_start.consumer = consumer

    @property
    def applied(self) -> int:
        return self.queue.applied

    @property
    def skipped(self) -> int:
        return self.queue.skipped
