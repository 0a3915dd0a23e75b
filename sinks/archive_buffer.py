"""The archive's buffered records on disk, for `switchboard run` on its embedded broker.

The archive writes a partition's records as one file when its buffer rolls (up
to ``roll_s``, 300 s by default). Until then the records are in the sink's memory
and in the broker's log. A Kafka of yours keeps the log, so after a crash the sink
reads them again from its committed offsets. The embedded broker keeps its log in
memory: a crash of `switchboard run` (SIGKILL, the OOM killer, a power cut) lost
every record the archive had buffered, up to ``roll_s`` of every topic, and nothing
said so (an analyst's review, 2026-12-01).

So on the embedded broker each batch the archive reads is also written here, one
SQLite transaction (WAL, ``synchronous=FULL``: fsynced) per batch, and a
partition's rows are deleted once its file is written. At the next start what is
left is written into files of the old log before anything else
(:meth:`sinks.archive.ArchiveHandler.recover_buffered`).

Rows carry a *generation*: the broker's log restarts its offsets at 0 after it
died under `switchboard run`, so (topic, partition, offset) alone could name two
records. Every log the archive reads gets a generation of its own; the rows of
earlier ones are what a start recovers.

What this does not cover: records the archive had not read yet when the process
died (its consumer lag, usually well under a second). The journal brings back
messages the queue had not applied, not those.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchboard.sqlitefile import open_durable, read_only, write_transaction

#: The buffer's file in the data directory.
BUFFER_FILE = "archive-buffer.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    records BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_written ON chunks (generation, topic, partition, last);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: A record's fixed part: offset, timestamp (-1: none), key and value lengths (-1:
#: none), header count; then the key, the value and each header (name length, value
#: length or -1, name, value).
_RECORD = struct.Struct(">qqiiH")
_HEADER = struct.Struct(">Hi")
#: Records held, every generation (a chunk partly in a file counts whole): for the
#: sink and for `switchboard status` from another process.
_DEPTH = "SELECT coalesce(sum(count), 0) FROM chunks"


@dataclass(frozen=True)
class StoredRecord:
    """A record as the archive read it: what :func:`sinks.archive_rows.to_row` needs."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def _bytes(value: Any) -> bytes | None:  # noqa: ANN401 - a record's key or value
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None


def _length(value: bytes | None) -> int:
    return -1 if value is None else len(value)


def encode(records: Sequence[Any]) -> bytes:
    """One partition's records (ConsumerRecords), framed with :mod:`struct`: a
    chunk a batch of thousands costs a few microseconds a record, where a row each
    cost 20 to 45 (measured here)."""
    parts: list[bytes] = []
    for r in records:
        stamp = r.timestamp if isinstance(getattr(r, "timestamp", None), int) else -1
        key, value = _bytes(r.key), _bytes(r.value)
        headers = [
            (str(name).encode(), _bytes(v)) for name, v in (getattr(r, "headers", None) or ())
        ]
        parts.append(_RECORD.pack(int(r.offset), stamp, _length(key), _length(value), len(headers)))
        parts.extend(x for x in (key, value) if x)
        for name, v in headers:
            parts.append(_HEADER.pack(len(name), _length(v)))
            parts.append(name)
            if v:
                parts.append(v)
    return b"".join(parts)


def decode(topic: str, partition: int, data: bytes) -> list[StoredRecord]:
    records: list[StoredRecord] = []
    view, at = memoryview(data), 0

    def take(length: int) -> bytes | None:
        nonlocal at
        if length < 0:
            return None
        chunk = bytes(view[at : at + length])
        at += length
        return chunk

    while at < len(data):
        offset, stamp, key_length, value_length, count = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        key, value = take(key_length), take(value_length)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name_length, header_length = _HEADER.unpack_from(data, at)
            at += _HEADER.size
            name = take(name_length) or b""
            headers.append((name.decode(errors="replace"), take(header_length)))
        records.append(
            StoredRecord(
                topic, partition, offset, None if stamp < 0 else stamp, key, value, headers
            )
        )
    return records


class BufferLog:
    """The rows the archive holds in memory, on disk until their file is written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = open_durable(path)
        self._db.executescript(_SCHEMA)
        (latest,) = self._db.execute("SELECT max(generation) FROM chunks").fetchone()
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        #: The log being read now; every row of a lower one is from an earlier log.
        #: Above every generation ever given, not only those with rows left: a log
        #: whose rows were all written still owns the current files.
        self.generation = max(int(latest or 0), int(meta.get("generation", 0))) + 1
        #: The generation whose log the current (not set aside) files hold; None
        #: before the first new log.
        self.files_generation: int | None = meta.get("files")
        self._set("generation", self.generation)
        #: The highest offset kept per partition of this log: a batch delivered
        #: again (the archive could not write and retries, a rewind) adds nothing.
        self._kept: dict[tuple[str, int], int] = {}

    def add(self, records: Sequence[Any]) -> None:
        """Keep a batch of records (ConsumerRecords): a chunk per partition, in one
        fsynced transaction. Records at or below an offset kept already are the same
        records again (one log, one offset) and are not kept twice: a sink that
        cannot write retries its batch every few seconds, for hours if need be."""
        by_partition: dict[tuple[str, int], list[Any]] = {}
        for r in records:
            tp = (str(r.topic), int(r.partition))
            if int(r.offset) > self._kept.get(tp, -1):
                by_partition.setdefault(tp, []).append(r)
        rows = [
            (
                self.generation,
                topic,
                partition,
                min(int(r.offset) for r in found),
                max(int(r.offset) for r in found),
                len(found),
                encode(found),
            )
            for (topic, partition), found in by_partition.items()
        ]
        if not rows:
            return
        with self._lock:
            with write_transaction(self._db):
                self._db.executemany(
                    "INSERT INTO chunks (generation, topic, partition, first, last, count,"
                    " records) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            for _, topic, partition, _, last, *_ in rows:
                self._kept[(topic, partition)] = max(last, self._kept.get((topic, partition), -1))

    def written(self, topic: str, partition: int, last: int) -> None:
        """A file of the current log holds this partition's rows up to ``last``. A
        chunk reaching past it stays (a start skips what the files hold)."""
        with self._lock:
            self._db.execute(
                "DELETE FROM chunks WHERE generation = ? AND topic = ? AND partition = ?"
                " AND last <= ?",
                (self.generation, topic, partition, last),
            )

    def next_generation(self) -> None:
        """The broker's log starts again (a new broker): its offsets restart at 0."""
        with self._lock:
            self.generation += 1
            self._kept.clear()
        self._set("generation", self.generation)

    def own_files(self) -> None:
        """The files of earlier logs are set aside: the current ones are this log's."""
        self.files_generation = self.generation
        self._set("files", self.generation)

    def _set(self, name: str, value: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def earlier_generations(self) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT generation FROM chunks WHERE generation < ? ORDER BY 1",
                (self.generation,),
            ).fetchall()
        return [int(g) for (g,) in rows]

    def records(self, generation: int) -> list[StoredRecord]:
        """One earlier log's records, in the order the archive read them (a record
        read twice is the same record: one log, one offset)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT topic, partition, records FROM chunks WHERE generation = ? ORDER BY id",
                (generation,),
            ).fetchall()
        return [r for topic, partition, data in rows for r in decode(topic, int(partition), data)]

    def forget(self, generation: int) -> None:
        """An earlier log's rows are in files now (or were already)."""
        with self._lock:
            self._db.execute("DELETE FROM chunks WHERE generation = ?", (generation,))

    def depth(self) -> int:
        """Records held (every generation; a chunk partly in a file counts whole)."""
        with self._lock:
            (count,) = self._db.execute(_DEPTH).fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_buffer_depth(data_dir: Path) -> int | None:
    """Rows the archive holds on disk and not in a file yet, from any process (for
    `switchboard status`); None where there is no buffer (a Kafka of yours)."""
    path = data_dir / BUFFER_FILE
    if not path.exists():
        return None
    with read_only(path) as db:
        try:
            (count,) = db.execute(_DEPTH).fetchone()
        except sqlite3.OperationalError:
            return None  # created, no table yet
    return int(count)
