"""One consumer runtime under the router, the queue sink and every later sink.

A handler only says what a batch of records does (:class:`RecordHandler`); the
runtime owns everything around it, once: poll, publish the events the handler
produced and wait for the broker's acknowledgement, commit offsets only after
that, back off during outages, report lag and liveness, and the poison policy.

The poison policy, as a careful Kafka consumer does it:

- an **outage** (:func:`is_outage`: the database or the broker unreachable, a
  timeout, a serialization failure or deadlock, a conflict the handler asks to
  retry) is nobody's record's fault: the whole batch is rewound and retried with
  capped exponential back-off, forever, and nothing is dead-lettered;
- anything else is a **failure of one record**: the batch is bisected until the
  failing record stands alone (the others go through), that record is tried
  ``max_attempts`` times, then written to ``switchboard.deadletter.v1`` with the
  stage, the reason, the exception and the original record, and the partition
  moves on. A handler that knows a record can never succeed raises
  :class:`PoisonRecord` to skip the retries.

Handlers must be idempotent per record (the router replays recorded events, the
queue skips applied event ids): bisection and redelivery run records again.
"""

from __future__ import annotations

import base64
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from sqlalchemy import exc as sa

from normalize.schema import BODY_CONTROLS, DeadLetter, strip_controls
from switchboard.config import ConsumerSettings, KafkaSettings
from switchboard.events import TYPE_DEADLETTER, Event
from switchboard.kafka import Publisher, PublishError, make_consumer
from switchboard.metrics import CONSUMER_RETRIES, DEAD_LETTERED, report_lag
from switchboard.runtime import ThreadedComponent
from switchboard.topics import DEADLETTER

log = logging.getLogger(__name__)

_LETTER_NAMESPACE = uuid.UUID("5d9f2c41-7e0b-4f36-9a8d-2b6c1e4f7a93")
#: The original record travels inside its dead letter up to this size; events stay
#: small by design (claim checks), so this cuts only what was hostile anyway.
MAX_INLINE_VALUE = 256 * 1024

# SQLSTATE classes that say "the database, not this row": connection exceptions,
# transaction rollback (serialization failure, deadlock), insufficient
# resources, operator intervention (shutdown, query cancelled), system errors.
_OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_OUTAGE_SQLSTATES = frozenset({"55P03"})  # lock_not_available (lock_timeout)


class Outage(Exception):
    """Raised (or subclassed) by a handler: not this record's fault; retry the batch
    later, never dead-letter (e.g. a conflict with another router)."""


class PoisonRecord(Exception):
    """Raised by a handler: this record can never succeed (it is not a valid event);
    dead-letter it now with ``reason``, without the retries."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency is away (retry, never dead-letter);
    False when it is about the record being handled (N tries, then dead letter)."""
    if isinstance(exc, PoisonRecord):
        return False
    if isinstance(exc, sa.DBAPIError):
        return _database_outage(exc)
    # The broker, the network, the connection pool (exhausted, or a connection
    # dropped), or a handler's own "retry later".
    return isinstance(
        exc,
        Outage | PublishError | KafkaError | OSError | sa.TimeoutError | sa.DisconnectionError,
    )


def _database_outage(exc: sa.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None)
    if isinstance(state, str) and state:
        return state[:2] in _OUTAGE_SQLSTATE_CLASSES or state in _OUTAGE_SQLSTATES
    # No SQLSTATE (SQLite, or the driver lost the connection): by class. SQLite's
    # "database is locked" is an OperationalError; a NUL byte is a DataError.
    return isinstance(exc, sa.OperationalError | sa.InterfaceError)


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a poll is applied, on again after.

    A poll allocates hundreds of thousands of objects (records, models, rows,
    events) that reference counting frees, and almost none in cycles; yet Python
    ran a collection every 700 of them: in one SQLite router, 1,760 young, 160
    middle and 14 full collections in a run of 22,400 records, 0.32 s of its 5 s,
    finding 78 objects in all (2026-11-29). Paused, what a poll leaves in cycles is
    found by the first collection after it (the next allocation triggers one), so
    it waits one poll at most. Only the thread that turned the collector off turns
    it on, and only if it was on: threads that overlap leave it on sooner, never
    off for good.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class RecordHandler:
    """What a consumer does with records; the runtime does the rest.

    ``handle`` makes a batch's effects durable (in its own transaction(s)) and
    returns the events to publish, as (topic, event) pairs, before the offsets
    are committed; it raises to say the batch did not happen. It must be
    idempotent per record.
    """

    stage: Literal["router", "sink"] = "sink"

    def prepare(self) -> None:
        """Once, before the first poll, in the caller (migrate, sync, reset)."""

    def handle(self, records: Sequence[Any]) -> Sequence[tuple[str, Event]]:
        raise NotImplementedError

    def acknowledged(self) -> None:
        """The last ``handle``'s effects are durable and its events acknowledged."""

    def idle(self) -> None:
        """A poll returned nothing: time for housekeeping. Errors are logged only."""

    def rewound(self) -> None:
        """The runtime rewound every partition to its start: the broker is new (the
        embedded one died and started again, empty). Runs on the consumer's thread
        before the new log is read."""

    def stopping(self) -> None:
        """The loop ends (a graceful stop): make durable what ``handle`` left in
        memory. A file sink writes its buffers: on the embedded broker the records
        after its commit are not read again, the broker forgets them. Errors are
        logged only."""

    def committable(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The next offsets the runtime may commit, given those of the handled records.

        A handler that makes records durable later than ``handle`` returns (a file
        sink buffering until a file rolls) holds the commit back to its first
        buffered offset; the records after it are read again after a restart.
        """
        return offsets


class _Interrupted(Exception):
    def __init__(self, done: int, cause: BaseException | None) -> None:
        super().__init__(done)
        self.done = done
        self.cause = cause


def _coordinates(record: Any) -> tuple[TopicPartition, int]:  # noqa: ANN401 - a ConsumerRecord
    return TopicPartition(record.topic, record.partition), int(record.offset)


class ConsumerRuntime(ThreadedComponent):
    """A consumer group member running one handler in a thread (kafka-python blocks)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        handler: RecordHandler,
        *,
        name: str,
        group_id: str,
        topics: Sequence[str],
        publisher: Publisher | None = None,
        policy: ConsumerSettings | None = None,
        max_poll_records: int = 500,
        listener: ConsumerRebalanceListener | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.kafka = kafka
        self.handler = handler
        self.group_id = group_id
        self.topics = list(topics)
        self.policy = policy or ConsumerSettings()
        self.max_poll_records = max_poll_records
        self.listener = listener
        self.stuck_after_s = self.policy.stuck_after_s
        self._publisher = publisher
        self._own_publisher: Publisher | None = None
        self._backoff = 0.0
        self.retries = 0
        self.dead_lettered = 0
        self._rewind_to_start = threading.Event()
        #: Set once a rewind asked by :meth:`rewind_to_start` is done (the handler told).
        self.rewound_to_start = threading.Event()
        # Set once the consumer has left its group and closed (after a stop).
        self.closed = threading.Event()
        # Per assigned partition: the next offset after the last record handled, and
        # the offset last committed. A handler that holds commits back (the archive,
        # until a file is written) releases them later, maybe while its partition gets
        # no record: those are committed at the next batch or idle poll
        # (:meth:`_commit_released`). A revocation or a rewind to the start forgets
        # them. The consumer's thread uses them; kafka-python 3 calls the rebalance
        # listener (:class:`_Forgetting`) on its network thread, but only while the
        # consumer's thread waits inside poll() or close(), never at the same time.
        self._handled: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        #: Partitions rewound to the start whose earliest offsets are not committed
        #: yet: the commit is tried again each turn until it is (or until one of ours
        #: supersedes it), so a failed one does not leave the old log's offset behind.
        self._starts_to_commit: set[TopicPartition] = set()

    # -- the loop -------------------------------------------------------------------

    def prepare(self) -> None:
        self.handler.prepare()

    def connected(self, consumer: KafkaConsumer) -> None:
        """The consumer exists and has subscribed (a rebuild's listener needs it)."""

    def rewind_to_start(self) -> None:
        """Read every assigned partition again from its earliest offset, from the next
        turn of the loop on: the embedded broker restarted with empty logs, and a
        position from before would be past records the new log has not reached yet."""
        self.rewound_to_start.clear()
        self._rewind_to_start.set()

    def _maybe_rewind_to_start(self, consumer: KafkaConsumer) -> None:
        if not self._rewind_to_start.is_set():
            return
        assigned = consumer.assignment()
        if not assigned:
            return  # not assigned yet: the first assignment starts from the committed offsets
        try:
            consumer.seek_to_beginning(*assigned)
        except Exception as exc:  # noqa: BLE001 - a broker still starting; the next turn retries
            log.warning("rewind to the start failed; retrying", extra={"error": repr(exc)[:500]})
            return
        self._rewind_to_start.clear()
        self._handled.clear()  # offsets of the old log: past the new one's end
        self._committed.clear()
        try:
            self.handler.rewound()
        except Exception as exc:  # noqa: BLE001 - logged; the loop goes on
            log.error("handler failed after the rewind", extra={"error": repr(exc)[:500]})
        self.rewound_to_start.set()
        log.warning(
            "consumer rewound to the earliest offsets (the broker is new)",
            extra={"component": self.name, "partitions": len(assigned)},
        )
        # The batch in hand when the broker died may have committed its old offsets to
        # the new broker (a commit retries until a coordinator answers): past the new
        # log's end, where a rejoining member would resume and skip what the new log
        # holds below them. So the earliest offsets are committed, until that succeeds.
        self._starts_to_commit = set(assigned)  # committed by the loop, from this turn

    def _commit_starts(self, consumer: KafkaConsumer) -> None:
        """Commit the earliest offsets of the partitions rewound to the start, except
        those we no longer own or have committed since (a later offset of the new log);
        kept for the next turn when the commit fails (a rebalance in progress, the new
        broker's coordinator not up yet: once only logged, a review found)."""
        if not self._starts_to_commit:
            return
        owned = consumer.assignment()
        self._starts_to_commit = {
            tp for tp in self._starts_to_commit if tp in owned and tp not in self._committed
        }
        if not self._starts_to_commit:
            return
        try:
            starts = consumer.beginning_offsets(list(self._starts_to_commit))
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in starts.items()})
        except Exception as exc:  # noqa: BLE001 - e.g. not in the group yet: next turn
            log.warning(
                "earliest offsets not committed after the rewind; trying again",
                extra={"component": self.name, "error": repr(exc)[:500]},
            )
            return
        self._starts_to_commit = set()

    def _run(self) -> None:
        try:
            consumer = make_consumer(
                self.kafka,
                group_id=self.group_id,
                topics=self.topics,
                listener=_Forgetting(self, self.listener),
                max_poll_records=self.max_poll_records,
            )
        except BaseException as exc:
            self.start_error = exc
            log.exception("consumer could not connect to Kafka", extra={"component": self.name})
            return
        self.connected(consumer)
        self.beat()
        self._ready.set()
        try:
            while not self._stop.is_set():
                self.beat()
                self._maybe_rewind_to_start(consumer)
                self._commit_starts(consumer)
                try:
                    polled = consumer.poll(timeout_ms=self.kafka.poll_timeout_ms)
                except KafkaError as exc:
                    log.warning("poll failed; retrying", extra={"error": repr(exc)[:500]})
                    self._wait(1.0)
                    continue
                report_lag(self.group_id, consumer)
                records = [r for batch in polled.values() for r in batch]
                if records:
                    self._process(consumer, records)
                else:
                    self._idle()
                    self._commit_released(consumer)
            self._stopping()
        except BaseException:
            # Only a bug in the runtime itself gets here; /readyz reports the thread.
            log.exception("consumer loop died", extra={"component": self.name})
            raise
        finally:
            try:
                consumer.close(autocommit=False)
            except Exception:  # closing a broken consumer must not mask the exit
                log.warning("consumer did not close cleanly", exc_info=True)
            if self._own_publisher is not None:
                self._own_publisher.close(timeout_s=2.0)
            self.closed.set()

    def _idle(self) -> None:
        try:
            self.handler.idle()
        except Exception as exc:  # noqa: BLE001 - housekeeping is retried at the next idle poll
            log.warning("idle work failed", extra={"error": repr(exc)[:500]})

    def _stopping(self) -> None:
        try:
            self.handler.stopping()
        except Exception as exc:  # noqa: BLE001 - the stop goes on; Kafka still has them
            log.error(
                "could not make the buffered records durable at the stop",
                extra={"component": self.name, "error": repr(exc)[:500]},
            )

    def _wait(self, seconds: float) -> None:
        """Sleep (interruptibly), still counting as alive: waiting out an outage is work."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self.beat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, 1.0))

    def _back_off(self) -> None:
        self.retries += 1
        CONSUMER_RETRIES.labels(self.group_id).inc()
        self._backoff = min(self.policy.backoff_max_s, max(0.2, self._backoff * 2))
        self._wait(self._backoff)

    # -- one batch ----------------------------------------------------------------

    def _process(self, consumer: KafkaConsumer, records: list[Any]) -> None:
        try:
            self._apply(records)
        except Exception as exc:  # noqa: BLE001 - every failure is classified below
            if is_outage(exc):
                log.warning(
                    "batch will be retried (outage)",
                    extra={"component": self.name, "error": repr(exc)[:500]},
                )
                self._rewind(consumer, records)
                self._back_off()
                return
            log.warning(
                "a record of the batch failed; isolating it",
                extra={"component": self.name, "error": repr(exc)[:500], "batch": len(records)},
            )
            try:
                self._isolate(records)
            except _Interrupted as stop:
                self._commit(consumer, records[: stop.done])
                self._rewind(consumer, records[stop.done :])
                if stop.cause is not None:
                    log.warning(
                        "isolating interrupted by an outage; retrying",
                        extra={"component": self.name, "error": repr(stop.cause)[:500]},
                    )
                    self._back_off()
                return
        self._commit(consumer, records)
        self._backoff = 0.0

    def _apply(self, records: Sequence[Any]) -> None:
        """Handle, publish what the handler produced, and only then report success."""
        with collector_paused():
            events = self.handler.handle(records)
            if events:
                self.publisher().publish_many(events)
            self.handler.acknowledged()

    def _isolate(self, records: list[Any]) -> None:
        """Bisect until the failing record stands alone; retry it, then dead-letter it.

        Raises :class:`_Interrupted` with how many leading records are done when an
        outage (or a stop) interrupts; those can be committed, the rest rewound.
        """
        segments: list[list[Any]] = [records]
        done = 0
        while segments:
            if self._stop.is_set():
                raise _Interrupted(done, None)
            segment = segments.pop(0)
            try:
                self._apply(segment)
                done += len(segment)
                continue
            except Exception as exc:
                if is_outage(exc):
                    raise _Interrupted(done, exc) from exc
                if len(segment) > 1:
                    middle = len(segment) // 2
                    segments[:0] = [segment[:middle], segment[middle:]]
                    continue
                self._retry_or_dead_letter(segment[0], exc, done)
                done += 1

    def _retry_or_dead_letter(self, record: Any, first: Exception, done: int) -> None:  # noqa: ANN401
        failure: Exception = first
        attempts = 1
        while not isinstance(failure, PoisonRecord) and attempts < self.policy.max_attempts:
            self._wait(min(self.policy.backoff_max_s, 0.1 * 2**attempts))
            if self._stop.is_set():
                raise _Interrupted(done, None)
            try:
                self._apply([record])
                return
            except Exception as exc:
                if is_outage(exc):
                    raise _Interrupted(done, exc) from exc
                failure = exc
                attempts += 1
        try:
            self._dead_letter(record, failure, attempts)
        except Exception as exc:
            # Not written: the record stays where it is and is tried again later.
            raise _Interrupted(done, exc) from exc

    # -- the dead letter ----------------------------------------------------------

    def _dead_letter(self, record: Any, failure: Exception, attempts: int) -> None:  # noqa: ANN401
        tp, offset = _coordinates(record)
        coordinates = f"{self.group_id}/{tp.topic}/{tp.partition}/{offset}"
        headers = _headers(getattr(record, "headers", None))
        reason = failure.reason if isinstance(failure, PoisonRecord) else "poison"
        reason = strip_controls(reason)[:64] or "poison"
        key = record.key.decode(errors="replace") if isinstance(record.key, bytes) else None
        source_event_id = headers.get("ce_id")
        letter = DeadLetter(
            # The same record always gives the same letter: a redelivery re-emits it.
            id=uuid.uuid5(_LETTER_NAMESPACE, coordinates),
            stage=self.handler.stage,
            reason=reason,
            detail=strip_controls(f"{type(failure).__name__}: {failure}", body=True)[:4000],
            occurred_at=datetime.now(UTC),
            source_event_id=(
                strip_controls(source_event_id)[:256] or None if source_event_id else None
            ),
            metadata={
                "consumer": self.name,
                "group": self.group_id,
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": offset,
                "key": strip_controls(key) if key is not None else None,
                "attempts": attempts,
                "error": type(failure).__name__,
                "headers": {strip_controls(k): strip_controls(v) for k, v in headers.items()},
                **_value_fields(getattr(record, "value", None)),
            },
        )
        event = Event(
            type=TYPE_DEADLETTER,
            source=f"switchboard/{self.name}",
            key=strip_controls(key) if key else coordinates,
            data=letter,
            id=str(letter.id),
        )
        self.publisher().publish_many([(DEADLETTER, event)])
        self.dead_lettered += 1
        DEAD_LETTERED.labels(self.handler.stage, reason).inc()
        log.error(
            "record dead-lettered; the partition moves on",
            extra={
                "component": self.name,
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": offset,
                "reason": reason,
                "attempts": attempts,
                "error": repr(failure)[:500],
            },
        )

    def publisher(self) -> Publisher:
        if self._publisher is not None:
            return self._publisher
        if self._own_publisher is None:
            self._own_publisher = Publisher(self.kafka)
        return self._own_publisher

    # -- offsets ------------------------------------------------------------------

    def _commit(self, consumer: KafkaConsumer, records: Sequence[Any]) -> None:
        batch: set[TopicPartition] = set()
        for record in records:
            tp, offset = _coordinates(record)
            self._handled[tp] = offset + 1
            batch.add(tp)
        self._commit_handled(consumer, batch)

    def _commit_released(self, consumer: KafkaConsumer) -> None:
        """Commit what the handler released since the last commit, for partitions that
        got no record since (an idle poll after the archive wrote a file): before, its
        committed offsets stayed at the first row of each file until the partition's
        next record, so a quiet partition looked behind and was read again after a
        restart."""
        if self._rewind_to_start.is_set():
            # The broker is new: offsets of the old log would be past the new one's
            # end (a rejoining member would skip what the new log has below them).
            return
        if self._handled:
            self._commit_handled(consumer, set())

    def _commit_handled(self, consumer: KafkaConsumer, batch: set[TopicPartition]) -> None:
        """Commit the handled offsets the handler allows: always the batch's partitions
        (as before), the others only where that moves their committed offset on."""
        allowed = self.handler.committable(dict(self._handled))
        wanted = {
            tp: offset
            for tp, offset in allowed.items()
            if tp in batch or offset > self._committed.get(tp, -1)
        }
        if not wanted:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in wanted.items()}
        try:
            consumer.commit(offsets)
            self.last_commit = time.time()
            self._committed.update(wanted)
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced: the new owner re-delivers these records, and the
            # handlers are idempotent. Nothing is lost or doubled.
            log.warning(
                "offset commit failed; records will be redelivered",
                extra={"component": self.name, "error": repr(exc)[:500]},
            )

    def _rewind(self, consumer: KafkaConsumer, records: Sequence[Any]) -> None:
        firsts: dict[TopicPartition, int] = {}
        for record in records:
            tp, offset = _coordinates(record)
            firsts.setdefault(tp, offset)
        for tp, offset in firsts.items():
            try:
                consumer.seek(tp, offset)
            except (AssertionError, KafkaError, ValueError):
                # Not assigned any more: its new owner starts from the committed offset.
                continue


class _Forgetting(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forgets a revoked partition's handled and committed offsets (its next owner
    commits from now on; ours would move its offset back), then calls the runtime's
    own listener, if any."""

    def __init__(self, runtime: ConsumerRuntime, inner: ConsumerRebalanceListener | None) -> None:
        self.runtime = runtime
        self.inner = inner

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        for tp in revoked:
            self.runtime._handled.pop(tp, None)
            self.runtime._committed.pop(tp, None)
        if self.inner is not None:
            self.inner.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if self.inner is not None:
            self.inner.on_partitions_assigned(assigned)


def _headers(raw: object) -> dict[str, str]:
    found: dict[str, str] = {}
    if isinstance(raw, list | tuple):
        for item in raw:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                value = item[1]
                found[item[0]] = (
                    value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                )[:1024]
    return found


def _value_fields(value: object) -> dict[str, Any]:
    """The original record's value for the dead letter: as text when it is clean
    UTF-8 (JSON events are), else base64; cut at :data:`MAX_INLINE_VALUE`."""
    if not isinstance(value, bytes):
        return {"value": None}
    cut = value[:MAX_INLINE_VALUE]
    fields: dict[str, Any] = {"value_size": len(value), "value_truncated": len(value) > len(cut)}
    try:
        text = cut.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and not BODY_CONTROLS.search(text):
        fields["value"] = text
    else:
        fields["value_base64"] = base64.b64encode(cut).decode()
    return fields
