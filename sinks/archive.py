"""The archive sink: every topic, as Parquet files an analyst's tools read directly.

Exactly once per offset range, as Kafka Connect's S3 sink does it:

- rows are buffered per partition and written as one file when the buffer rolls
  (size, age, or a new day); the file appears whole (temporary name, fsync,
  rename) or not at all;
- offsets are committed only up to the first record still buffered
  (:meth:`ArchiveHandler.committable`), so a crash loses nothing: the records
  after the last file are read again;
- the file names say which offsets the archive holds: a record at or below the
  last archived offset of its partition is skipped, so the records read again
  never land in a second file; a file written again over a range (a zombie
  member after a rebalance) replaces the files it covers.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from sinks.archive_buffer import BufferLog
from sinks.archive_files import Archive, Part
from sinks.archive_iceberg import IcebergTable
from sinks.archive_rows import row_day, to_row, to_table
from sinks.archive_state import ArchiveState
from sinks.settings import ArchiveSettings
from switchboard.config import ConsumerSettings, KafkaSettings
from switchboard.consumer import ConsumerRuntime, Outage, RecordHandler
from switchboard.events import Event
from switchboard.kafka import Publisher
from switchboard.topics import ALL_TOPICS, DEADLETTER

log = logging.getLogger(__name__)

GROUP = "switchboard-archive"
#: Per-row overhead added to the value's size when estimating a buffer's bytes.
_ROW_OVERHEAD = 256


@dataclass
class _Buffer:
    day: str
    first: int
    started: float
    last: int = -1
    size: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def truncate(self, offset: int) -> None:
        """Forget the rows from ``offset`` on: they are being delivered again."""
        self.rows = [r for r in self.rows if r["offset"] < offset]
        self.last = self.rows[-1]["offset"] if self.rows else -1
        self.size = sum(_ROW_OVERHEAD + len(r.get("data") or r.get("raw") or "") for r in self.rows)


class ArchiveHandler(RecordHandler):
    """Buffers rows per partition and writes them as Parquet files; never rejects a
    record (a bad one gets a row with ``archive_error``)."""

    stage = "sink"

    def __init__(
        self, archive: Archive, settings: ArchiveSettings, iceberg: IcebergTable | None = None
    ) -> None:
        self.archive = archive
        self.settings = settings
        self.iceberg = iceberg
        self._synced_files = -1  # files written when the Iceberg table was last synced
        self._sync_failures = 0  # failed syncs in a row
        self._sync_retry_at = 0.0  # monotonic time before which no sync is tried
        self._sync_warned_at = 0.0
        self._buffers: dict[TopicPartition, _Buffer] = {}
        self._next: dict[TopicPartition, int] = {}
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        self.files = 0
        self.rows = 0  # rows written to files
        self.buffered = 0  # rows ever added to a buffer (bench/archive.py)
        self.skipped = 0
        self.consumer: Any = None  # a KafkaConsumer, set by the sink once connected
        #: Called with the event ids of the dead letters each file holds, once it is
        #: written (`switchboard run`: the journal keeps ingest's dead letters until then).
        self.on_dead_letters_written: Callable[[list[str]], None] | None = None
        #: `switchboard run`'s embedded broker: the topics' partitions. Its logs are
        #: new at every start (and after it died): the files of the old logs are set
        #: aside then (new_log), since the new offsets start at 0 again.
        self.embedded_partitions: int | None = None
        #: The report `switchboard status` reads (the sink's data dir), when set.
        self.state: ArchiveState | None = None
        #: On the embedded broker: what is buffered, on disk until its file is
        #: written, so that a crash does not lose it (:mod:`sinks.archive_buffer`).
        self.buffer_log: BufferLog | None = None

    def _archived_next(self, tp: TopicPartition) -> int:
        """The first offset of ``tp`` the archive does not hold yet (from its files)."""
        if tp not in self._next:
            parts = self.archive.parts(tp.topic, tp.partition)
            archived = max((p.last + 1 for p in parts), default=0)
            end = self.log_end(tp) if parts else None
            if end is not None and end < archived:
                # The log is shorter than the archive: a new broker (the embedded one
                # keeps nothing across restarts) numbering from 0 again. The old files
                # keep their rows under a name that no new range can collide with.
                tag = f"before-{int(time.time())}"
                for part in parts:
                    self.archive.retire(part, tag)
                log.warning(
                    "partition log is new; earlier archive files kept as %s-part-*",
                    tag,
                    extra={"topic": tp.topic, "partition": tp.partition, "files": len(parts)},
                )
                archived = 0
            self._next[tp] = archived
        return self._next[tp]

    def log_end(self, tp: TopicPartition) -> int | None:
        """The partition log's end offset, when a consumer is there to ask."""
        if self.consumer is None:
            return None
        ends = self.consumer.end_offsets([tp])
        end = ends.get(tp)
        return int(end) if end is not None else None

    def handle(self, records: Sequence[Any]) -> list[tuple[str, Event]]:
        if self.buffer_log is not None:
            try:
                self.buffer_log.add(records)
            except sqlite3.Error as exc:  # a full disk: read again later
                raise Outage(f"archive buffer not writable: {exc}") from exc
        try:
            for record in records:
                self._add(record)
            self._flush_aged()
        except OSError as exc:
            raise Outage(f"archive not writable: {exc}") from exc
        return []

    def _add(self, record: Any) -> None:  # noqa: ANN401 - a ConsumerRecord
        tp = self._tps.get((record.topic, record.partition))
        if tp is None:
            tp = self._tps[(record.topic, record.partition)] = TopicPartition(
                record.topic, record.partition
            )
        offset = int(record.offset)
        if offset < self._archived_next(tp):
            self.skipped += 1
            return
        buffer = self._buffers.get(tp)
        if buffer is not None and offset <= buffer.last:
            buffer.truncate(offset)  # a rewind, a retry or a bisection replays it
            if not buffer.rows:
                del self._buffers[tp]
                buffer = None
        row = to_row(record)
        day = row_day(row)
        if buffer is not None and buffer.day != day:
            self._flush(tp)
            buffer = None
        if buffer is None:
            buffer = self._buffers[tp] = _Buffer(day=day, first=offset, started=time.monotonic())
        buffer.rows.append(row)
        self.buffered += 1
        buffer.last = offset
        buffer.size += _ROW_OVERHEAD + len(record.value or b"")
        if buffer.size >= self.settings.roll_bytes:
            self._flush(tp)

    def _flush_aged(self) -> None:
        now = time.monotonic()
        for tp in [
            tp for tp, b in self._buffers.items() if now - b.started >= self.settings.roll_s
        ]:
            self._flush(tp)

    def _flush(self, tp: TopicPartition) -> None:
        buffer = self._buffers[tp]
        part = Part(tp.topic, buffer.day, tp.partition, buffer.rows[0]["offset"], buffer.last)
        sink = io.BytesIO()
        pq.write_table(to_table(buffer.rows), sink, compression=self.settings.compression)
        try:
            self.archive.write(part, sink.getvalue())
        except Exception as exc:
            if self.state is not None:
                self.state.failed(exc)
            raise
        if self.state is not None:
            self.state.written(part)
        for old in self.archive.parts(tp.topic, tp.partition):
            if (
                old != part
                and old.day == part.day
                and part.first <= old.first <= old.last <= part.last
            ):
                # Only a second writer of the same range gets here: keep one copy.
                self.archive.remove(old)
                log.warning(
                    "archive file replaced", extra={"old": old.relative, "new": part.relative}
                )
        del self._buffers[tp]
        self._next[tp] = part.last + 1
        if self.buffer_log is not None:
            try:
                self.buffer_log.written(tp.topic, tp.partition, part.last)
            except sqlite3.Error as exc:  # the rows stay; a start skips what files hold
                log.error("archive buffer not trimmed", extra={"error": repr(exc)})
        if self.on_dead_letters_written is not None and tp.topic == DEADLETTER:
            try:
                self.on_dead_letters_written([str(r["id"]) for r in buffer.rows if r.get("id")])
            except Exception as exc:  # noqa: BLE001 - the file is written; they stay journaled
                log.error("journal not told of archived dead letters", extra={"error": repr(exc)})
        self.files += 1
        self.rows += len(buffer.rows)
        log.info("archive file written", extra={"file": part.relative, "rows": len(buffer.rows)})

    def committable(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        held: dict[TopicPartition, int] = {}
        for tp, offset in offsets.items():
            buffer = self._buffers.get(tp)
            held[tp] = min(offset, buffer.first) if buffer is not None else offset
        return held

    def idle(self) -> None:
        try:
            self._flush_aged()
        except OSError as exc:
            raise Outage(f"archive not writable: {exc}") from exc
        self.sync_iceberg()

    def prepare(self) -> None:
        self.sync_iceberg()  # what a crash left written but not registered
        if self.embedded_partitions is not None:
            self.recover_buffered()  # `switchboard run` did so already, before its replay
            self.new_log()  # a new embedded broker: its logs start at 0

    def recover_buffered(self) -> int:
        """Write what earlier runs had buffered and not written (they crashed) into
        files of their old logs, then set those aside with the rest of each log's
        files; returns the rows written. Only the log the current files belong to
        (the buffer records which) may skip rows those files hold already; before any
        other log's rows, the current files are set aside first, so that no file of
        another log is taken for one of its own (review of 2026-12-01: rows of a log
        two runs back were skipped against the files of the one between, and counted
        as recovered). A log is forgotten once its rows are in files and before the
        files are set aside: a crash between the two leaves files a start sets aside,
        not rows it writes again. A log whose rows cannot be written stays for the
        next start."""
        buffer_log = self.buffer_log
        if buffer_log is None:
            return 0
        recovered = 0
        for generation in buffer_log.earlier_generations():
            if generation != buffer_log.files_generation:
                self.new_log()  # nothing buffered: only sets the other log's files aside
            rows_before = self.rows
            try:
                for record in buffer_log.records(generation):
                    self._add(record)
            except OSError as exc:
                log.error("archive buffer not recovered", extra={"error": repr(exc)})
                self._buffers.clear()
                break
            self.stopping()
            if self._buffers:  # a file was not written: kept for the next start
                self._buffers.clear()
                break
            buffer_log.forget(generation)
            recovered += self.rows - rows_before
            self.new_log()
        if recovered:
            log.warning(
                "archive: rows buffered when switchboard last stopped without writing "
                "them are in files now",
                extra={"rows": recovered},
            )
        return recovered

    def rewound(self) -> None:
        if self.embedded_partitions is not None:
            self.new_log()  # the embedded broker died and started again, empty

    def new_log(self) -> None:
        """Write what is buffered (rows of the old logs), then set every file of the
        old logs aside under a ``before-<time>-`` name. Without this, a new log's
        offsets, numbered from 0 again, were taken for archived ones whenever the
        files already reached them (the old check, a log shorter than the files,
        missed every new log that had grown as far before its first record was
        read): the first records after each start were skipped (review, 2026-12-01)."""
        self.stopping()
        if self.buffer_log is not None:
            self.buffer_log.next_generation()
        tag = f"before-{time.time_ns()}"
        retired = 0
        for topic in ALL_TOPICS:
            for partition in range(self.embedded_partitions or 0):
                while found := self.archive.parts(topic, partition):  # newest day first
                    for part in found:
                        self.archive.retire(part, tag)
                        retired += 1
        self._next.clear()
        if self.buffer_log is not None:
            self.buffer_log.own_files()  # the files from now on are the new log's
        if retired:
            log.warning(
                "new broker logs: earlier archive files kept as %s-part-*",
                tag,
                extra={"files": retired},
            )
            # The table named the files by their old names: synced now, not after
            # the next file (a scan failed with FileNotFoundError from every start
            # of `switchboard run` until a message came; review, 2026-12-01).
            self._synced_files = -1
            self.sync_iceberg()

    def stopping(self) -> None:
        """Write every buffer as a file: on `switchboard run`'s embedded broker a
        record buffered at a stop was gone for good (the broker forgets it, and the
        next start reads a new, empty log), up to ``roll_s`` (300 s) of every topic.
        A restarted sink skips what the file names say it holds, so nothing doubles."""
        for tp in list(self._buffers):
            self._write_out(tp, "at the stop")
        self.sync_iceberg()

    def _write_out(self, tp: TopicPartition, when: str) -> bool:
        """``_flush`` with a failure logged, not raised (the other buffers are still
        written); False when it failed, the buffer still held."""
        try:
            self._flush(tp)
        except Exception as exc:  # noqa: BLE001 - see above
            log.error(
                "archive file not written %s",
                when,
                extra={"topic": tp.topic, "partition": tp.partition, "error": repr(exc)},
            )
            return False
        return True

    def sync_iceberg(self) -> None:
        """Register new files in the Iceberg table (at start, then when idle after
        writing some). The table is derived from the files: a failure never holds
        the archive back. A failing catalog is retried with a growing pause (2 s
        doubling to 5 min) and logged once when it starts failing, at most every
        10 min while it keeps failing, and once when it is back."""
        if self.iceberg is None or self._synced_files == self.files:
            return
        now = time.monotonic()
        if now < self._sync_retry_at:
            return
        try:
            self.iceberg.sync()
        except Exception as exc:  # noqa: BLE001 - retried after a pause
            self._sync_failures += 1
            pause = min(2.0 * 2 ** (self._sync_failures - 1), 300.0)
            self._sync_retry_at = now + pause
            if self._sync_failures == 1 or now - self._sync_warned_at >= 600:
                self._sync_warned_at = now
                log.warning(
                    "iceberg table not synced; the files are written, the table is behind",
                    extra={
                        "error": repr(exc)[:500],
                        "failures": self._sync_failures,
                        "retry_in_s": pause,
                    },
                )
            return
        if self._sync_failures:
            log.info("iceberg table synced again", extra={"failures": self._sync_failures})
        self._sync_failures = 0
        self._sync_retry_at = 0.0
        self._synced_files = self.files

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Another member reads these now, from the committed offsets: write what is
        buffered (the new owner skips what the file names hold; on the embedded
        broker, a rejoin after it died, the records are nowhere else any more: they
        were dropped here before) and forget what we knew of their files."""
        for tp in partitions:
            if tp in self._buffers and not self._write_out(tp, "at a revocation"):
                self._buffers.pop(tp, None)  # read again by the new owner
            self._next.pop(tp, None)


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, handler: ArchiveHandler) -> None:
        self.handler = handler

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.handler.revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        pass


class ArchiveSink(ConsumerRuntime):
    """The archive's consumer: :class:`ArchiveHandler` on the consumer runtime."""

    def __init__(
        self,
        kafka: KafkaSettings,
        archive: Archive,
        settings: ArchiveSettings,
        *,
        group_id: str = GROUP,
        publisher: Publisher | None = None,
        policy: ConsumerSettings | None = None,
        iceberg: IcebergTable | None = None,
    ) -> None:
        self.archive_handler = ArchiveHandler(archive, settings, iceberg)
        super().__init__(
            kafka.model_copy(update={"fetch_max_wait_ms": settings.fetch_max_wait_ms}),
            self.archive_handler,
            name="archive-sink",
            group_id=group_id,
            topics=ALL_TOPICS,
            publisher=publisher,
            policy=policy,
            listener=_Revocations(self.archive_handler),
            # Rows are cheap and a commit is a round trip: bigger batches, fewer commits.
            max_poll_records=2000,
        )

    def connected(self, consumer: Any) -> None:  # noqa: ANN401 - a KafkaConsumer
        self.archive_handler.consumer = consumer
