"""The router process: a consumer group on ``switchboard.inbound.v1``.

Per poll: parse the batch and route it in one database transaction
(:meth:`RouterStore.route_batch`); the consumer runtime (:mod:`switchboard.consumer`)
publishes every event it produced, waits for the broker's acknowledgements, and
only then commits the offsets. A crash at any point re-delivers the batch; the
store replays recorded events with their ids, so the re-delivery changes nothing
and re-emits the same events.

An outage (database or broker away) rewinds the batch and retries it with
back-off; a record that keeps failing on its own is dead-lettered by the
runtime's poison policy and the partition moves on.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from normalize.schema import DeadLetter, InboundMessage, strip_controls
from router.store import Outcome, RouterStore, topic_of
from switchboard.config import ConsumerSettings, KafkaSettings
from switchboard.consumer import ConsumerRuntime, RecordHandler
from switchboard.events import (
    TYPE_DEADLETTER,
    TYPE_INBOUND,
    EnvelopeError,
    Event,
    read_data,
    read_meta,
)
from switchboard.kafka import Publisher
from switchboard.metrics import DEAD_LETTERED, ROUTER_DECISIONS
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
    ce_id = next(
        (
            value.decode(errors="replace")
            for name, value in getattr(record, "headers", None) or []
            if name == "ce_id" and isinstance(value, bytes)
        ),
        None,
    )
    letter = DeadLetter(
        source_event_id=strip_controls(ce_id)[:256] or None if ce_id else None,
        id=letter_id,
        stage="router",
        reason=f"envelope-{error.reason}",
        detail=strip_controls(error.detail, body=True)[:4000],
        occurred_at=datetime.now(UTC),
        metadata={"topic": topic, "partition": partition, "offset": offset},
    )
    key = getattr(record, "key", None)
    return Event(
        type=TYPE_DEADLETTER,
        source="switchboard/router",
        key=strip_controls(key.decode(errors="replace")) if isinstance(key, bytes) else "unknown",
        data=letter,
        id=str(letter_id),
    )


def parse(record: object) -> InboundMessage:
    meta = read_meta(getattr(record, "headers", None))
    if meta.type != TYPE_INBOUND:
        raise EnvelopeError("type", f"unexpected event type {meta.type!r}")
    return read_data(getattr(record, "value", None), InboundMessage)


class RoutingHandler(RecordHandler):
    """Parse a batch, route it in one transaction (:meth:`RouterStore.route_batch`),
    return the events it produced; the consumer runtime publishes and commits."""

    stage = "router"

    def __init__(self, store: RouterStore, publisher: Publisher, purge_every_s: float) -> None:
        self.store = store
        self.publisher = publisher
        self.purge_every_s = purge_every_s
        self.stats = RouterStats()
        self._next_purge = time.monotonic()
        self._outcomes: list[Outcome] = []
        self._bad = 0

    def prepare(self) -> None:
        if self.store.config.merge_policy == "any":
            log.warning(
                "router merge_policy is 'any': a claimed identity (anyone's web form, a "
                "forged From) links and merges contacts; use it only where every sender "
                "is trusted"
            )
        self.store.sync_owners()

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        self._outcomes, self._bad = [], 0
        messages: list[InboundMessage] = []
        bad: list[Event] = []
        for record in records:
            try:
                messages.append(parse(record))
            except EnvelopeError as exc:
                log.warning(
                    "record is not a valid inbound event; dead-lettered",
                    extra={
                        "reason": exc.reason,
                        "partition": record.partition,
                        "offset": record.offset,
                    },
                )
                bad.append(_bad_record(record, exc))
        outcomes = self.store.route_batch(messages) if messages else []
        self._outcomes, self._bad = outcomes, len(bad)
        events = [e for o in outcomes for e in o.events] + bad
        return [(topic_of(e), e) for e in events]

    def acknowledged(self) -> None:
        self.stats.batches += 1
        self.stats.last_commit = time.time()
        # Counted per kind, then one increment each: a label look-up per message was
        # 1% of the router's time.
        decided = Counter((o.result, o.reason or o.result) for o in self._outcomes)
        for (result, reason), n in decided.items():
            self.stats.results[result] += n
            ROUTER_DECISIONS.labels(result, reason).inc(n)
            if result == "failed":
                DEAD_LETTERED.labels("router", "routing-failed").inc(n)
        if self._bad:
            ROUTER_DECISIONS.labels("bad-record", "envelope").inc(self._bad)
            DEAD_LETTERED.labels("router", "envelope").inc(self._bad)
        self.stats.results["bad-record"] += self._bad
        self._outcomes, self._bad = [], 0

    def idle(self) -> None:
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + self.purge_every_s
            self._purge()
        self._relay_pending()

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


class Router(ConsumerRuntime):
    """The router: :class:`RoutingHandler` on the consumer runtime, as a component."""

    def __init__(
        self,
        kafka: KafkaSettings,
        store: RouterStore,
        publisher: Publisher,
        *,
        group_id: str = GROUP,
        max_batch: int = 2000,
        purge_every_s: float = 3600.0,
        policy: ConsumerSettings | None = None,
    ) -> None:
        self.store = store
        self.routing = RoutingHandler(store, publisher, purge_every_s)
        super().__init__(
            kafka,
            self.routing,
            name="router",
            group_id=group_id,
            topics=[INBOUND],
            publisher=publisher,
            policy=policy,
            max_poll_records=max_batch,
        )

    @property
    def stats(self) -> RouterStats:
        return self.routing.stats
