"""Blob packs: the small blobs of many messages appended to one file, one sync a group.

A blob as a file of its own costs its file system a new inode, a directory entry
(often a new directory of the ``ab/cd`` fan-out), a rename and their journal
commits: measured here 90 to 1,000 µs of kernel time a 2 KB blob, most of an
edge's kernel time, and a ``syncfs`` that waits for every dirty page of the file
system. Appended to a pack, the same blob costs one ``writev`` and a share of one
``fdatasync``: about 14 µs (``bench/blob_layouts.py``).

Layout, under the blob store's root::

    packs/<ms>-<pid>-<token>-<n>.pack   records, appended by one writer
    packs/index.sqlite3                 digest -> (pack, offset): a cache

A record is a 44-byte header (``SBP1``, the blob's SHA-256 as 32 bytes, its size
as 8 bytes big-endian) and the blob's bytes. A pack has one writer, the process
that created it, which holds a shared ``flock`` on it while it may append; it
moves to a new pack at :data:`ROTATE_BYTES` or :data:`ROTATE_AGE_S`, and after any
failed write or sync (a pack with a torn record is never appended to again: a
reader stops at the first record it cannot read).

The index is a cache, never the truth: it is filled by readers from the packs
themselves (``catch_up``: only the bytes appended since the last look), may lose
its latest commits in a crash (``synchronous=NORMAL``) and is rebuilt from the
packs if it is unreadable. Every read checks the record's header and its bytes'
SHA-256 against the digest asked for, so a stale or wrong row is a miss, never
wrong bytes.

Collection (:func:`collect_packs`, from ``switchboard.blobs.collect_garbage``):
a pack untouched for the retention period whose writer is gone (its ``flock``
can be taken exclusively) is read whole; the blobs a table still references are
appended again to the collector's own pack (young again) and the old pack is
deleted. A blob written again for a new message is a new record in a young pack,
so a message never depends on an old pack's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from normalize.content import Blob
from switchboard.files import fsync_dir, make_dirs

if TYPE_CHECKING:
    from switchboard.blobs import FileBlobStore, GcReport, References

log = logging.getLogger(__name__)

MAGIC = b"SBP1"
HEADER = struct.Struct(">4s32sQ")
PACKS = "packs"
SUFFIX = ".pack"
INDEX = "index.sqlite3"
#: A writer moves to a new pack past this many bytes ...
ROTATE_BYTES = 64 * 1024 * 1024
#: ... or once its pack is this old: collection takes whole packs, so a pack is
#: closed well before any retention period can end.
ROTATE_AGE_S = 3600.0
#: How packs are opened to be read: never through a symbolic link put in their place.
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(eq=False)
class _Pack:
    """The writer's open pack."""

    path: Path
    fd: int
    opened: float  # time.monotonic()
    pid: int  # of the process that opened it
    size: int = 0
    syncing: int = 0  # appends whose fdatasync has not returned
    retired: bool = False  # no more appends; closed once ``syncing`` is 0


@dataclass(frozen=True)
class Record:
    sha256: str
    offset: int  # of the header
    size: int  # of the blob's bytes


def read_records(fd: int, start: int, end: int) -> tuple[list[Record], int]:
    """The whole records between ``start`` and ``end`` (a size read before), and where
    the first record that is not whole begins (being appended, or torn by a crash)."""
    records: list[Record] = []
    offset = start
    while offset + HEADER.size <= end:
        header = os.pread(fd, HEADER.size, offset)
        if len(header) < HEADER.size:
            break
        magic, digest, size = HEADER.unpack(header)
        if magic != MAGIC or offset + HEADER.size + size > end:
            break
        records.append(Record(digest.hex(), offset, size))
        offset += HEADER.size + size
    return records, offset


def read_blob(path: Path, offset: int, size: int, sha256: str) -> bytes | None:
    """The blob at ``offset`` of ``path`` if it is whole and its bytes are ``sha256``."""
    try:
        fd = os.open(path, _READ)
    except OSError:  # gone (collected), or not a pack file (a link)
        return None
    try:
        record = os.pread(fd, HEADER.size + size, offset)
    finally:
        os.close(fd)
    if len(record) != HEADER.size + size:
        return None
    magic, digest, length = HEADER.unpack_from(record)
    data = record[HEADER.size :]
    if magic != MAGIC or length != size or digest.hex() != sha256:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data


def _write_all(fd: int, buffers: list[bytes]) -> None:
    """Every buffer, in order, at the end of ``fd`` (``writev`` may write a part)."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


class PackWriter:
    """One process's appends to its own packs (thread-safe)."""

    def __init__(
        self,
        directory: Path,
        root: Path,
        known_dirs: set[Path],
        *,
        rotate_bytes: int = ROTATE_BYTES,
        rotate_age_s: float = ROTATE_AGE_S,
    ) -> None:
        self.directory = directory
        self._root = root
        self._known_dirs = known_dirs
        self._rotate_bytes = rotate_bytes
        self._rotate_age_s = rotate_age_s
        self._lock = threading.Lock()
        self._pack: _Pack | None = None
        self._token = secrets.token_hex(4)
        self._numbers = itertools.count()

    def append(self, blobs: Sequence[Blob]) -> None:
        """Append the blobs and return once they are on disk (raises OSError if not)."""
        buffers: list[bytes] = []
        for blob in blobs:
            buffers.append(HEADER.pack(MAGIC, bytes.fromhex(blob.ref.sha256), len(blob.data)))
            buffers.append(blob.data)
        total = sum(len(b) for b in buffers)
        with self._lock:
            pack = self._writable(total)
            try:
                _write_all(pack.fd, buffers)
            except BaseException:
                self._retire(pack)  # perhaps a torn record at its end: never appended to again
                raise
            pack.size += total
            pack.syncing += 1
        try:
            # Every append before this one too: concurrent groups share the syncs.
            os.fdatasync(pack.fd)
        except BaseException:
            # After a failed write-back the kernel may call the pages clean: a later
            # sync of this pack could pass without writing them.
            with self._lock:
                self._retire(pack)
            raise
        finally:
            with self._lock:
                pack.syncing -= 1
                self._close_if_done(pack)

    def current(self) -> Path | None:
        with self._lock:
            return None if self._pack is None else self._pack.path

    def close(self) -> None:
        with self._lock:
            if self._pack is not None:
                self._retire(self._pack)

    def _writable(self, adding: int) -> _Pack:
        pack = self._pack
        if pack is not None and pack.pid != os.getpid():
            self._pack = pack = None  # inherited across a fork: its writer is the parent
        if (
            pack is not None
            and pack.size
            and (
                pack.size + adding > self._rotate_bytes
                or time.monotonic() - pack.opened > self._rotate_age_s
            )
        ):
            self._retire(pack)
            pack = None
        if pack is None:
            pack = self._pack = self._open_new()
        return pack

    def _open_new(self) -> _Pack:
        make_dirs(self.directory, self._root, self._known_dirs)
        name = f"{int(time.time() * 1000):013d}-{os.getpid()}-{self._token}-{next(self._numbers)}"
        path = self.directory / f"{name}{SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o600)
        try:
            # Held while this process may append: a collector takes packs it can lock
            # exclusively, so never one with a live writer.
            fcntl.flock(fd, fcntl.LOCK_SH)
            fsync_dir(self.directory)  # its name survives a crash before any blob is told stored
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return _Pack(path, fd, time.monotonic(), os.getpid())

    def _retire(self, pack: _Pack) -> None:
        if self._pack is pack:
            self._pack = None
        pack.retired = True
        self._close_if_done(pack)

    @staticmethod
    def _close_if_done(pack: _Pack) -> None:
        if pack.retired and pack.syncing == 0 and pack.fd >= 0:
            os.close(pack.fd)  # releases its flock
            pack.fd = -1


class PackIndex:
    """digest -> (pack, offset, size), filled from the packs (a cache; thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / INDEX
        try:
            db = self._open(path)
        except sqlite3.DatabaseError as exc:
            # A cache: an unreadable one is built again from the packs.
            log.warning("blob pack index unreadable, rebuilt", extra={"error": repr(exc)})
            for stale in (path, path.with_name(INDEX + "-wal"), path.with_name(INDEX + "-shm")):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            db = self._open(path)
        self._db = db
        return db

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS packs "
                "(name TEXT PRIMARY KEY, indexed_to INTEGER NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS records (sha256 BLOB NOT NULL, pack TEXT NOT NULL, "
                "offset INTEGER NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (pack, offset))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS records_sha256 ON records (sha256)")
            db.execute("SELECT count(*) FROM packs").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def lookup(self, sha256: str) -> list[tuple[str, int, int]]:
        """Where ``sha256`` was appended, newest pack first."""
        with self._lock:
            rows = self._connect().execute(
                "SELECT pack, offset, size FROM records WHERE sha256 = ? ORDER BY pack DESC",
                (bytes.fromhex(sha256),),
            )
            return [(str(p), int(o), int(s)) for p, o, s in rows]

    def catch_up(self) -> None:
        """Index what was appended to any pack since the last look; forget packs gone."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                known = {
                    str(n): int(t) for n, t in db.execute("SELECT name, indexed_to FROM packs")
                }
                present = set()
                for name, size in _pack_files(self.directory):
                    present.add(name)
                    start = known.get(name, 0)
                    if size <= start:
                        continue
                    try:
                        fd = os.open(self.directory / name, _READ)
                    except OSError:  # gone (collected), or not a pack file (a link)
                        present.discard(name)
                        continue
                    try:
                        records, end = read_records(fd, start, size)
                    finally:
                        os.close(fd)
                    db.executemany(
                        "INSERT OR IGNORE INTO records (sha256, pack, offset, size) "
                        "VALUES (?, ?, ?, ?)",
                        [(bytes.fromhex(r.sha256), name, r.offset, r.size) for r in records],
                    )
                    db.execute(
                        "INSERT INTO packs (name, indexed_to) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET indexed_to = excluded.indexed_to",
                        (name, end),
                    )
                for gone in known.keys() - present:
                    self._forget(db, gone)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def count(self, name: str) -> int:
        """How many distinct blobs the index holds for pack ``name``."""
        with self._lock:
            row = (
                self._connect()
                .execute("SELECT count(DISTINCT sha256) FROM records WHERE pack = ?", (name,))
                .fetchone()
            )
            return int(row[0])

    def forget(self, name: str) -> None:
        """A pack about to be deleted: its rows go first (a reader then looks again)."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                self._forget(db, name)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def _forget(db: sqlite3.Connection, name: str) -> None:
        db.execute("DELETE FROM records WHERE pack = ?", (name,))
        db.execute("DELETE FROM packs WHERE name = ?", (name,))


def _pack_files(directory: Path) -> Iterator[tuple[str, int]]:
    """(name, size) of every pack in ``directory``."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                yield entry.name, entry.stat(follow_symlinks=False).st_size


class Packs:
    """A blob store's packs: its writer, its index, and reads."""

    def __init__(
        self,
        root: Path,
        known_dirs: set[Path],
        *,
        rotate_bytes: int = ROTATE_BYTES,
        rotate_age_s: float = ROTATE_AGE_S,
    ) -> None:
        self.directory = root / PACKS
        self.writer = PackWriter(
            self.directory,
            root,
            known_dirs,
            rotate_bytes=rotate_bytes,
            rotate_age_s=rotate_age_s,
        )
        self.index = PackIndex(self.directory)

    def put(self, blobs: Sequence[Blob]) -> None:
        self.writer.append(blobs)

    def get(self, sha256: str) -> bytes | None:
        """The blob from any pack, or None. Looks again after indexing what is new, and
        after a collection moved it (its old pack gone: its rows are gone first)."""
        if not self.directory.is_dir():
            return None
        for attempt in range(3):
            for pack, offset, size in self.index.lookup(sha256):
                data = read_blob(self.directory / pack, offset, size, sha256)
                if data is not None:
                    return data
            if attempt < 2:
                self.index.catch_up()
        return None

    def close(self) -> None:
        self.writer.close()
        self.index.close()


def collect_packs(
    store: FileBlobStore,
    packs: Packs,
    references: Sequence[References],
    cutoff: float,
    report: GcReport,
    *,
    dry_run: bool,
) -> None:
    """Collect the packs untouched since ``cutoff`` (see the module's text)."""
    packs.index.catch_up()
    for name, _size in sorted(_pack_files(packs.directory)):
        try:
            fd = os.open(packs.directory / name, _READ)
        except OSError:  # gone (collected), or not a pack file (a link)
            continue
        try:
            try:
                # Not while a writer may append to it (it holds a shared lock), nor
                # while another collector takes it.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                young = True
            else:
                info = os.fstat(fd)
                if info.st_nlink == 0:
                    continue  # deleted by another collector meanwhile
                young = info.st_mtime >= cutoff
            if young:
                counted = packs.index.count(name)
                report.scanned += counted
                report.young += counted
                continue
            _collect_pack(
                store, packs, name, fd, references=references, report=report, dry_run=dry_run
            )
        finally:
            os.close(fd)


def _collect_pack(
    store: FileBlobStore,
    packs: Packs,
    name: str,
    fd: int,
    *,
    references: Sequence[References],
    report: GcReport,
    dry_run: bool,
) -> None:
    """One old pack, locked: what is referenced is written again, the pack deleted."""
    records, _end = read_records(fd, 0, os.fstat(fd).st_size)
    digests = {r.sha256: r for r in records}
    report.scanned += len(digests)
    referenced: set[str] = set()
    for find in references:
        referenced |= find(digests.keys())
    referenced &= digests.keys()
    report.referenced += len(referenced)
    dropped = [(d, r.size) for d, r in digests.items() if d not in referenced]
    if not dropped and len(records) == len(digests):
        return  # all still needed: left as it is, looked at again next time
    report.deleted.extend(dropped)
    if dry_run:
        return
    kept: list[Blob] = []
    for digest in sorted(referenced):
        record = digests[digest]
        data = os.pread(fd, record.size, record.offset + HEADER.size)
        if hashlib.sha256(data).hexdigest() != digest:
            # Kept as it is, for whoever looks into it: nothing is deleted from it.
            log.error("blob pack record damaged", extra={"pack": name, "sha256": digest})
            del report.deleted[len(report.deleted) - len(dropped) :]
            return
        kept.append(Blob.of(data, "application/octet-stream"))
    if kept:
        store.put_many(kept)  # young again, in this process's pack, synced
    packs.index.forget(name)  # readers look again, and find the copies
    (packs.directory / name).unlink()
    fsync_dir(packs.directory)
