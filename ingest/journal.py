"""The local journal: what ingest accepted, kept on disk until the queue has it.

Only `switchboard run` on the embedded (in-memory) broker uses it. That broker
acknowledges a record and forgets it when it dies; a sender told "250" cannot
know which broker sits behind the port. So every accepted inbound event is also
written here, fsynced, before the sender is answered, and stays until the
router has recorded the message and the queue sink has applied every event the
router recorded for it (:mod:`switchboard.recovery` decides that and prunes).
At a start, or when the embedded broker restarted, what is still here is
published again; the event ids and dedupe keys are stable, so what had made it
through is dropped as a duplicate.

It lives in the spool's SQLite file (a table of its own): the same reasons as
the spool's (WAL, ``synchronous=FULL``, torn writes rolled back by SQLite,
depth readable from ``switchboard status``). Appends are group-committed by one
writer thread: every append that queued while the last commit was fsyncing goes
into the next one, so the cost per message stays a fraction of one fsync.

With an external Kafka the journal is not used: Kafka's replication is the
durability there.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from switchboard.events import Event
from switchboard.sqlitefile import open_durable, read_only, write_transaction
from switchboard.topics import DEADLETTER

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    time TEXT NOT NULL,
    subject TEXT,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    journaled_at REAL NOT NULL,
    recorded INTEGER NOT NULL DEFAULT 0
)
"""

#: Longest a group commit waits for more appends to join it (after the first).
_GATHER_S = 0.002


@dataclass(frozen=True)
class Journaled:
    """One journaled event: republished with the same id, time and bytes."""

    seq: int
    message_id: str
    topic: str
    event: Event
    recorded: bool  # the router recorded the message; the queue may not have it yet


@dataclass(frozen=True)
class JournalDepth:
    messages: int  # every entry, dead letters included
    bytes: int
    oldest_age_s: float | None
    dead_letters: int = 0  # ingest's, kept until the archive has written them


@dataclass
class _Pending:
    row: tuple[object, ...]
    size: int
    done: concurrent.futures.Future[None]


class Journal:
    """An fsynced table of accepted events, in the spool's SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_durable(path)  # its busy wait: the spool writes the same file
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()  # one statement on the connection at a time
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM journal"
        ).fetchone()
        self._messages: int = count
        self._bytes: int = size
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="journal", daemon=True)
        self._writer.start()
        if count:
            log.warning(
                "journal holds messages the queue may not have; they will be checked "
                "and published again",
                extra={"path": str(path), "messages": count, "bytes": size},
            )

    # -- writing -------------------------------------------------------------

    def submit(self, topic: str, event: Event, message_id: str) -> concurrent.futures.Future[None]:
        """Queue one event; the future resolves once it is fsynced (or fails)."""
        value = event.value()
        row = (
            event.id,
            message_id,
            topic,
            event.type,
            event.source,
            event.key,
            event.time.isoformat(),
            event.subject,
            value,
            len(value) + len(event.key),
        )
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                done.set_exception(OSError("journal is closed"))
                return done
            self._queue.append(_Pending(row, len(value) + len(event.key), done))
            self._wake.notify()
        return done

    def append(self, topic: str, event: Event, message_id: str) -> None:
        """Append one event and return once it is fsynced."""
        self.submit(topic, event, message_id).result()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue and self._closed:
                    return
            # Let appends that are arriving right now join this commit.
            time.sleep(_GATHER_S)
            with self._wake:
                batch, self._queue = self._queue, []
            error = self._write(batch)
            for pending in batch:
                if error is None:
                    pending.done.set_result(None)
                else:
                    pending.done.set_exception(error)

    def _write(self, batch: list[_Pending]) -> BaseException | None:
        now = time.time()
        try:
            with self._lock, write_transaction(self._db):
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO journal (event_id, message_id, topic, type,"
                    " source, key, time, subject, value, size, journaled_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(*p.row, now) for p in batch],
                )
                added = self._db.total_changes - before
        except sqlite3.Error as exc:
            log.error("journal write failed", extra={"path": str(self.path), "error": repr(exc)})
            return OSError(f"journal write failed: {exc}")
        if added == len(batch):
            self._messages += added
            self._bytes += sum(p.size for p in batch)
        else:  # an event id journaled twice (a hand-off retried): count from the table
            self._recount()
        return None

    # -- reading and pruning -------------------------------------------------

    def entries(self, limit: int, after_seq: int = 0) -> list[Journaled]:
        """Up to ``limit`` entries after ``after_seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, message_id, topic, event_id, type, source, key, time, subject,"
                " value, recorded FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def mark_recorded(self, seqs: Sequence[int]) -> None:
        """The router recorded these messages: no need to route them again."""
        self._execute_many("UPDATE journal SET recorded = 1 WHERE seq = ?", seqs)

    def remove(self, seqs: Sequence[int]) -> None:
        """Forget entries the queue has applied."""
        if self._execute_many("DELETE FROM journal WHERE seq = ?", seqs):
            self._recount()

    def forget(self, event_ids: Sequence[str]) -> None:
        """Forget these events (dead letters the archive has written to its files)."""
        if self._execute_many("DELETE FROM journal WHERE event_id = ?", event_ids):
            self._recount()

    def count(self, topic: str) -> int:
        """Entries of ``topic`` (dead letters: a few, unless the archive cannot write)."""
        with self._lock:
            (found,) = self._db.execute(
                "SELECT count(*) FROM journal WHERE topic = ?", (topic,)
            ).fetchone()
        return int(found)

    def forget_topic(self, topic: str) -> int:
        """Forget every entry of ``topic``; how many there were."""
        with self._lock:
            removed = self._db.execute("DELETE FROM journal WHERE topic = ?", (topic,)).rowcount
        if removed:
            self._recount()
        return int(removed)

    def _execute_many(self, sql: str, keys: Sequence[int] | Sequence[str]) -> bool:
        if not keys:
            return False
        with self._lock, write_transaction(self._db):
            self._db.executemany(sql, [(k,) for k in keys])
        return True

    def _recount(self) -> None:
        with self._lock:
            count, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM journal"
            ).fetchone()
        self._messages, self._bytes = count, size

    @property
    def messages(self) -> int:
        return self._messages

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._writer.join(5)
        with self._lock:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> Journaled:
    seq, message_id, topic, event_id, type_, source, key, at, subject, value, recorded = row
    event = Event(
        type=type_,
        source=source,
        key=key,
        data=value,
        id=event_id,
        time=datetime.fromisoformat(at),
        subject=subject,
    )
    return Journaled(seq, message_id, topic, event, bool(recorded))


def read_journal_depth(path: Path) -> JournalDepth | None:
    """Depth of the journal in a spool file, from any process; None if it has none."""
    with read_only(path) as db:
        try:
            count, size, oldest, dead = db.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(journaled_at),"
                " coalesce(sum(topic = ?), 0) FROM journal",
                (DEADLETTER,),
            ).fetchone()
        except sqlite3.OperationalError:
            return None  # no journal table: an external Kafka, or a role process
    age = None if oldest is None else max(0.0, time.time() - oldest)
    return JournalDepth(count, size, age, dead)
