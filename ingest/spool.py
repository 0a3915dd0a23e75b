"""The durable local spool: where ingest keeps messages while Kafka is away.

When the broker does not acknowledge within a short bound, the hand-off appends
the event to this spool and answers the sender as durable; a drainer thread
publishes the spooled events, oldest first, once the broker is back, and deletes
each only after the broker acknowledged it.

Why SQLite in WAL mode rather than an append-only segment log of our own: a
commit with ``synchronous=FULL`` is fsynced (measured 0.5 ms here, one row, and
2.9 ms for 100 rows), a torn write at a crash is rolled back by SQLite instead of
by a recovery scanner we would have to write and test, deleting acknowledged rows
needs no compaction, and ``switchboard status`` can read the depth from another
process while ingest writes. Appends from many threads are group-committed: one
thread writes everything that queued up meanwhile in one transaction.

Re-publishing after a crash between the acknowledgement and the delete is
harmless: the event id and the dedupe key are stable, and the router dedupes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from normalize.schema import BlobRef, DeadLetter
from switchboard.events import TYPE_DEADLETTER, Event
from switchboard.metrics import (
    DEAD_LETTERED,
    MULTIPROCESS,
    SPOOL_BYTES,
    SPOOL_DRAINED,
    SPOOL_MESSAGES,
)
from switchboard.sqlitefile import open_durable, read_only, write_transaction
from switchboard.topics import DEADLETTER

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    time TEXT NOT NULL,
    subject TEXT,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    spooled_at REAL NOT NULL
)
"""


class SpoolFull(Exception):
    """The spool reached its size bound: the sender must retry later."""


class SpoolBusy(Exception):
    """Another process holds the spool file (each file has one owner)."""


@dataclass(frozen=True)
class Spooled:
    """One spooled event; re-published with the same id, time and bytes."""

    seq: int
    topic: str
    event: Event

    @property
    def size(self) -> int:
        return len(self.event.value()) + len(self.event.key)


@dataclass(frozen=True)
class SpoolDepth:
    messages: int
    bytes: int
    oldest_age_s: float | None


class Spool:
    """A bounded, fsynced FIFO of events on local disk.

    One spool file belongs to one process (its drainer deletes what it published):
    an exclusive lock on ``<file>.lock``, held until :meth:`close` or the process's
    death, makes a second owner wait ``wait_s`` for it, then raise SpoolBusy (a
    worker replacing a dead one gets the file as soon as the kernel has released
    the lock). Other processes may read its depth.
    """

    def __init__(
        self, path: Path, *, max_bytes: int, max_messages: int, wait_s: float = 10.0
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as undo:  # a failed set-up releases what it took
            self._owner = _own(path, wait_s)
            undo.callback(os.close, self._owner)
            self._db = open_durable(path)
            undo.callback(self._db.close)
            self._db.execute(_SCHEMA)
            undo.pop_all()
        self._lock = threading.Lock()  # one statement on the connection at a time
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM spool"
        ).fetchone()
        self._messages: int = count
        self._bytes: int = size
        # Group commit: appends queue here; one of the waiting threads writes them all.
        self._commit = threading.Condition()
        self._queue: list[tuple[int, Spooled]] = []
        self._writing = False
        self._ticket = 0
        self._done: dict[int, BaseException | None] = {}
        self.on_change: Callable[[], None] | None = None
        if count:
            log.warning(
                "spool holds messages from an earlier run; they will be published",
                extra={"path": str(path), "messages": count, "bytes": size},
            )

    # -- writing -------------------------------------------------------------

    def append(self, topic: str, event: Event) -> None:
        """Append one event and return once it is fsynced; raise SpoolFull past the bound."""
        # Serialize once: the stored bytes are the ones published later.
        record = Spooled(0, topic, replace(event, data=event.value()))
        with self._commit:
            if not self.has_room(record.size):
                raise SpoolFull(f"spool full ({self._messages} messages, {self._bytes} bytes)")
            # Reserve the room now, so concurrent appends cannot overshoot the bound.
            self._messages += 1
            self._bytes += record.size
            self._ticket += 1
            ticket = self._ticket
            self._queue.append((ticket, record))
            while ticket not in self._done:
                if self._writing:
                    self._commit.wait()
                    continue
                batch, self._queue = self._queue, []
                self._writing = True
                self._commit.release()
                try:
                    error = self._write(batch)
                finally:
                    self._commit.acquire()
                    self._writing = False
                for t, rec in batch:
                    self._done[t] = error
                    if error is not None:
                        self._messages -= 1
                        self._bytes -= rec.size
                self._commit.notify_all()
            error = self._done.pop(ticket)
        if error is not None:
            raise error
        if self.on_change is not None:
            self.on_change()

    def _write(self, batch: list[tuple[int, Spooled]]) -> BaseException | None:
        now = time.time()
        rows = [
            (
                r.topic,
                r.event.id,
                r.event.type,
                r.event.source,
                r.event.key,
                r.event.time.isoformat(),
                r.event.subject,
                r.event.value(),
                r.size,
                now,
            )
            for _, r in batch
        ]
        try:
            with self._lock, write_transaction(self._db):
                self._db.executemany(
                    "INSERT INTO spool (topic, event_id, type, source, key, time, subject,"
                    " value, size, spooled_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
        except sqlite3.Error as exc:
            log.error("spool write failed", extra={"path": str(self.path), "error": repr(exc)})
            return OSError(f"spool write failed: {exc}")
        return None

    # -- draining ------------------------------------------------------------

    def peek(self, limit: int) -> list[Spooled]:
        """The oldest ``limit`` events, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, event_id, type, source, key, time, subject, value"
                " FROM spool ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            Spooled(
                seq,
                topic,
                Event(
                    type=type_,
                    source=source,
                    key=key,
                    data=value,
                    id=event_id,
                    time=datetime.fromisoformat(at),
                    subject=subject,
                ),
            )
            for seq, topic, event_id, type_, source, key, at, subject, value in rows
        ]

    def remove(self, records: Sequence[Spooled]) -> None:
        """Delete events the broker acknowledged."""
        if not records:
            return
        with self._lock, write_transaction(self._db):
            self._db.executemany("DELETE FROM spool WHERE seq = ?", [(r.seq,) for r in records])
        with self._commit:
            self._messages -= len(records)
            self._bytes -= sum(r.size for r in records)
        if self.on_change is not None:
            self.on_change()

    # -- reading -------------------------------------------------------------

    def has_room(self, size: int) -> bool:
        """Whether one more record of ``size`` bytes is within both bounds."""
        return self._messages + 1 <= self.max_messages and self._bytes + size <= self.max_bytes

    @property
    def messages(self) -> int:
        return self._messages

    @property
    def bytes(self) -> int:
        return self._bytes

    def depth(self) -> SpoolDepth:
        return read_depth(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        os.close(self._owner)  # releases the lock


def _own(path: Path, wait_s: float) -> int:
    """An exclusive flock on ``<path>.lock`` (its fd), waiting up to ``wait_s``."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise SpoolBusy(
                    f"spool {path} is held by another process (one owner per file)"
                ) from None
            time.sleep(0.1)


def read_depth(path: Path) -> SpoolDepth:
    """Depth of a spool file, from any process (``switchboard status``)."""
    with read_only(path) as db:
        count, size, oldest = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM spool"
        ).fetchone()
    age = None if oldest is None else max(0.0, time.time() - oldest)
    return SpoolDepth(count, size, age)


#: The spools this process's drainers publish from (the gauges sum them).
_DRAINED: list[Spool] = []


class Drainer:
    """Publishes spooled events, oldest first, and deletes each once acknowledged.

    Runs in a thread of its own. While the broker is away it retries with a
    capped backoff; a crash loses nothing (rows are deleted only after the
    acknowledgement) and at worst re-publishes one batch.
    """

    def __init__(
        self,
        spool: Spool,
        publish: Callable[[Sequence[tuple[str, Event]]], object],
        *,
        batch: int = 500,
        max_backoff_s: float = 5.0,
        on_published: Callable[[Sequence[Spooled]], None] | None = None,
        name: str = "spool",
        max_event_bytes: int | None = None,
    ) -> None:
        self.name = name
        self._max_event_bytes = max_event_bytes
        self.spool = spool
        self._publish = publish
        self._batch = batch
        self._max_backoff_s = max_backoff_s
        self._on_published = on_published
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        spool.on_change = self._changed
        _DRAINED.append(spool)
        SPOOL_MESSAGES.set_function(lambda: sum(s.messages for s in _DRAINED))
        SPOOL_BYTES.set_function(lambda: sum(s.bytes for s in _DRAINED))
        self._changed()

    def _changed(self) -> None:
        self._wake.set()
        if MULTIPROCESS:
            # A set_function gauge is read in-process only; prometheus-client's
            # multiprocess mode sums the values each worker writes to its files.
            SPOOL_MESSAGES.set(sum(s.messages for s in _DRAINED))
            SPOOL_BYTES.set(sum(s.bytes for s in _DRAINED))

    def begin(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-drainer", daemon=True)
        self._thread.start()

    def end(self, timeout_s: float = 5.0) -> None:
        """Stop after the batch in hand; what is left stays spooled for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with contextlib.suppress(ValueError):
            _DRAINED.remove(self.spool)

    async def start(self) -> None:
        self.begin()

    async def stop(self) -> None:
        await asyncio.to_thread(self.end)

    def drain_once(self) -> int:
        """Publish one batch; return how many were published (raises if not acknowledged)."""
        records = self.spool.peek(self._batch)
        if not records:
            return 0
        publishable = [self._publishable(r) for r in records]
        self._publish(publishable)
        self.spool.remove(records)
        SPOOL_DRAINED.inc(len(records))
        # Counted once published, as the hand-off counts the dead letters it writes.
        letters = sum(
            event is not r.event for r, (_, event) in zip(records, publishable, strict=True)
        )
        if letters:
            DEAD_LETTERED.labels("ingest", "too-large").inc(letters)
        if self._on_published is not None:
            self._on_published(records)
        return len(records)

    def _publishable(self, record: Spooled) -> tuple[str, Event]:
        """The record, or a dead letter about it when Kafka would refuse it for its
        size: a spool written before events were clipped could hold one, and it
        would stop every record behind it for good."""
        limit = self._max_event_bytes
        if limit is None or len(record.event.value()) <= limit:
            return record.topic, record.event
        log.error(
            "spooled event too large for Kafka: dead-lettered",
            extra={"event_id": record.event.id, "size": len(record.event.value())},
        )
        return DEADLETTER, too_large(record.topic, record.event, limit)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if self.spool.messages == 0:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                published = self.drain_once()
            except Exception as exc:  # noqa: BLE001 - the broker is still away; keep the rows
                backoff = min(self._max_backoff_s, max(0.2, backoff * 2))
                log.warning(
                    "spool drain failed; will retry",
                    extra={
                        "error": str(exc),
                        "spooled": self.spool.messages,
                        "retry_in_s": backoff,
                    },
                )
                self._stop.wait(backoff)
                continue
            if backoff:
                log.info("spool draining again", extra={"spooled": self.spool.messages})
            backoff = 0.0
            if published and self.spool.messages == 0:
                log.info("spool drained")


def too_large(topic: str, event: Event, limit: int) -> Event:
    """A dead letter standing for an event over ``limit`` bytes: its id, adapter and
    raw blob when its JSON names them."""
    value = event.value()
    try:
        data = json.loads(value)
        record_id = uuid.UUID(str(data["id"]))
        adapter = str(data["adapter"])[:64] if data.get("adapter") else None
        raw = BlobRef.model_validate(data["raw"]) if data.get("raw") else None
    except (ValueError, KeyError, TypeError):
        record_id, adapter, raw = uuid.uuid4(), None, None
    letter = DeadLetter(
        id=record_id,
        stage="ingest",
        adapter=adapter,
        reason="too-large",
        detail=f"the event is {len(value)} bytes, over the {limit} an event may be",
        occurred_at=datetime.now(UTC),
        raw=raw,
        source_event_id=event.id,
        metadata={"topic": topic, "size": len(value)},
    )
    return Event(
        type=TYPE_DEADLETTER,
        source=event.source,
        key=f"deadletter:{adapter or 'unknown'}",
        data=letter,
        subject=str(record_id),
    )
