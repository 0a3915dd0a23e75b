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
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import re
import secrets
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from normalize.content import Blob
from switchboard.files import fsync_dir, make_dirs
from switchboard.sqlitefile import write_transaction

if TYPE_CHECKING:
    from switchboard.blobs import FileBlobStore, GcReport, References

log = logging.getLogger(__name__)

MAGIC = b"SBP1"
HEADER = struct.Struct(">4s32sQ")
PACKS = "packs"
SUFFIX = ".pack"
INDEX = "index.sqlite3"
#: A pack holds blobs under this size (bigger ones are files): a header saying more
#: is damage, not a record.
MAX_RECORD = 1024 * 1024
#: A new pack's name while its writer takes its lock: never read nor collected.
NEW_SUFFIX = ".new"
#: A writer moves to a new pack past this many bytes ...
ROTATE_BYTES = 64 * 1024 * 1024
#: ... or once its pack is this old: collection takes whole packs, so a pack is
#: closed well before any retention period can end.
ROTATE_AGE_S = 3600.0
#: How packs are opened to be read: never through a symbolic link put in their place.
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
#: A blob's address: its SHA-256 as 64 lower-case hex digits.
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(eq=False)
class _Pack:
    """The writer's open pack."""

    path: Path
    fd: int
    opened: float  # time.monotonic()
    pid: int  # of the process that opened it
    size: int = 0  # bytes appended (under the writer's lock)
    synced: int = 0  # bytes a completed fdatasync covers (under ``sync_lock``)
    failed: BaseException | None = None  # a failed write or sync: every later sync fails
    syncing: int = 0  # appends not yet answered
    retired: bool = False  # no more appends; closed once ``syncing`` is 0
    sync_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Record:
    sha256: str
    offset: int  # of the header
    size: int  # of the blob's bytes


def _header_at(fd: int, offset: int, end: int) -> tuple[bytes, int] | None:
    """The digest and size a sound header at ``offset`` gives, for a record that ends
    by ``end``; None where no such header is (its bytes not checked)."""
    header = os.pread(fd, HEADER.size, offset)
    if len(header) < HEADER.size:
        return None
    magic, digest, size = HEADER.unpack(header)
    if magic != MAGIC or size >= MAX_RECORD or offset + HEADER.size + size > end:
        return None
    return digest, size


def read_records(fd: int, start: int, end: int) -> tuple[list[Record], int]:
    """The whole records between ``start`` and ``end`` (a size read before), and where
    the first record that is not whole begins (being appended, or torn by a crash)."""
    records: list[Record] = []
    offset = start
    while (header := _header_at(fd, offset, end)) is not None:
        digest, size = header
        records.append(Record(digest.hex(), offset, size))
        offset += HEADER.size + size
    return records, offset


def records_of(path: Path) -> list[Record]:
    """The whole records of the pack at ``path`` from its start (OSError if unreadable)."""
    fd = _open_pack(path)
    try:
        return read_records(fd, 0, os.fstat(fd).st_size)[0]
    finally:
        os.close(fd)


def read_blob(path: Path, offset: int, size: int, sha256: str) -> bytes | None:
    """The blob at ``offset`` of ``path`` if it is whole and its bytes are ``sha256``."""
    if not (0 <= size < MAX_RECORD and offset >= 0):
        return None  # a wrong index row: a miss
    try:
        fd = _open_pack(path)
    except OSError:  # gone (collected), or not a pack file (a link)
        return None
    try:
        record = os.pread(fd, HEADER.size + size, offset)
    except OSError as exc:  # a bad block: a miss here, perhaps a copy elsewhere
        log.warning("blob pack unreadable", extra={"pack": path.name, "error": repr(exc)})
        return None
    finally:
        os.close(fd)
    return _verified(record, size, sha256)


def _verified(record: bytes, size: int, sha256: str) -> bytes | None:
    """A record's bytes if its header and their SHA-256 say ``sha256`` and ``size``."""
    if len(record) != HEADER.size + size:
        return None
    magic, digest, length = HEADER.unpack_from(record)
    data = record[HEADER.size :]
    if magic != MAGIC or length != size or digest.hex() != sha256:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data


def _iov_max() -> int:
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))
    except (ValueError, OSError):
        return 1024


#: Buffers one ``writev`` takes (Linux: 1,024); a group may carry thousands of blobs.
IOV_MAX = _iov_max()


def _write_all(fd: int, buffers: list[bytes]) -> None:
    """Every buffer, in order, at the end of ``fd`` (``writev`` may write a part, and
    takes at most :data:`IOV_MAX` buffers)."""
    views = [memoryview(b) for b in buffers if b]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


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
        self._closed = False

    def append(self, blobs: Sequence[Blob]) -> None:
        """Append the blobs and return once they are on disk (raises OSError if not)."""
        buffers: list[bytes] = []
        for blob in blobs:
            buffers.append(HEADER.pack(MAGIC, bytes.fromhex(blob.ref.sha256), len(blob.data)))
            buffers.append(blob.data)
        total = sum(len(b) for b in buffers)
        with self._lock:
            if self._closed:
                raise OSError("the blob store is closed")
            pack = self._writable(total)
            try:
                _write_all(pack.fd, buffers)
            except BaseException as exc:
                # Perhaps a torn record at its end: never appended to again, and no
                # sync of it may answer anyone any more.
                pack.failed = exc
                self._retire(pack)
                raise
            pack.size += total
            end = pack.size
            pack.syncing += 1
        try:
            self._sync(pack, end)
        finally:
            with self._lock:
                pack.syncing -= 1
                self._close_if_done(pack)

    def _sync(self, pack: _Pack, end: int) -> None:
        """Return once the pack's first ``end`` bytes are on disk.

        One fdatasync at a time a pack, covering every append finished before it
        started: concurrent groups share it. A failure is the pack's for good. The
        kernel reports a write-back error once per open file, so of two threads
        syncing the same descriptor one may hear 0 for pages that were lost; here
        every append the failed sync did not cover, and every later one, fails."""
        with pack.sync_lock:
            if pack.failed is not None:
                raise OSError(f"blob pack failed: {pack.failed}") from pack.failed
            if pack.synced >= end:
                return  # a sync that started after this append covered it
            with self._lock:
                covering = pack.size
            try:
                os.fdatasync(pack.fd)
            except BaseException as exc:
                # After a failed write-back the kernel may call the pages clean: a
                # later sync of this pack could pass without writing them.
                pack.failed = exc
                with self._lock:
                    self._retire(pack)
                raise
            pack.synced = covering

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more appends (OSError); the open pack is closed once its syncs return."""
        with self._lock:
            self._closed = True
            if self._pack is not None:
                self._retire(self._pack)

    def _writable(self, adding: int) -> _Pack:
        pack = self._pack
        if pack is not None and pack.pid != os.getpid():
            # Inherited across a fork: its writer is the parent. This copy of the
            # descriptor is closed (the parent's own keeps its lock).
            with contextlib.suppress(OSError):
                os.close(pack.fd)
            self._pack = pack = None
        if pack is not None and (
            pack.failed is not None
            or pack.retired
            or (
                pack.size
                and (
                    pack.size + adding > self._rotate_bytes
                    or time.monotonic() - pack.opened > self._rotate_age_s
                )
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
        # Created under a dot name, which readers and collectors pass by, and renamed
        # into place once locked: no collector can take it in between.
        new = self.directory / f".{name}{SUFFIX}{NEW_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(new, flags, 0o600)
        placed = False
        try:
            # Held while this process may append: a collector takes packs it can lock
            # exclusively, so never one with a live writer.
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.rename(new, path)
            placed = True
            fsync_dir(self.directory)  # its name survives a crash before any blob is told stored
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                (path if placed else new).unlink()
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
            fd, pack.fd = pack.fd, -1
            os.close(fd)  # releases its flock


#: SQLite's codes for a file that is not (or no longer) a sound database.
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
#: Rows a transaction of ``catch_up`` writes at most: others wait for it.
_BATCH = 5000
#: How long a reader waits for another process's index transaction before it reads
#: the packs themselves instead.
BUSY_TIMEOUT_S = 5.0


class IndexUnavailable(Exception):
    """The index cannot answer now (busy, full, read-only, damaged): read the packs."""


class PackIndex:
    """digest -> (pack, offset, size), filled from the packs (a cache; thread-safe).

    Every failure of SQLite is :class:`IndexUnavailable` to the caller, who then
    reads the packs themselves; a damaged file is also set aside and built again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._inode: int | None = None  # of the file ``_db`` opened
        self._pid = os.getpid()
        self._inherited: list[sqlite3.Connection] = []

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None and self._pid != os.getpid():
            # Across a fork SQLite's connection must not be used, nor closed.
            self._inherited.append(self._db)
            self._db, self._pid = None, os.getpid()
        if self._db is not None:
            return self._db
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / INDEX
        try:
            self._inode = os.stat(path).st_ino  # what a damaged file is told apart by
        except FileNotFoundError:
            self._inode = None
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
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
            self._inode = os.stat(path).st_ino
            db.execute("SELECT 1 FROM records LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _failed(self, exc: sqlite3.Error | OSError) -> IndexUnavailable:
        """Drop the connection; a damaged file (the one this process opened, not one
        another process has built since) is deleted, to be built again."""
        path = self.directory / INDEX
        try:
            # Compared while the connection still holds the file: its inode is ours.
            same = self._inode is None or os.stat(path).st_ino == self._inode
        except OSError:
            same = False
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if getattr(exc, "sqlite_errorname", None) in _DAMAGED and same:
            log.warning("blob pack index damaged, built again", extra={"error": repr(exc)})
            for stale in (path, path.with_name(INDEX + "-wal"), path.with_name(INDEX + "-shm")):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        return IndexUnavailable(repr(exc))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def lookup(self, sha256: str) -> list[tuple[str, int, int]]:
        """Where ``sha256`` was appended, newest pack first."""
        with self._lock:
            try:
                rows = self._connect().execute(
                    "SELECT pack, offset, size FROM records WHERE sha256 = ? ORDER BY pack DESC",
                    (bytes.fromhex(sha256),),
                )
                return [(str(p), int(o), int(s)) for p, o, s in rows]
            except (sqlite3.Error, OSError) as exc:
                raise self._failed(exc) from exc

    def count(self, name: str) -> int:
        """How many distinct blobs the index holds for pack ``name``."""
        with self._lock:
            try:
                row = (
                    self._connect()
                    .execute("SELECT count(DISTINCT sha256) FROM records WHERE pack = ?", (name,))
                    .fetchone()
                )
            except (sqlite3.Error, OSError) as exc:
                raise self._failed(exc) from exc
            return int(row[0])

    def catch_up(self) -> None:
        """Index what was appended to any pack since the last look; forget packs gone.
        The packs are read outside any transaction; their rows go in short ones."""
        with self._lock:
            try:
                self._catch_up(self._connect())
            except (sqlite3.Error, OSError) as exc:
                raise self._failed(exc) from exc

    def _catch_up(self, db: sqlite3.Connection) -> None:
        known = {str(n): int(t) for n, t in db.execute("SELECT name, indexed_to FROM packs")}
        present: set[str] = set()
        for name, size in _pack_files(self.directory):
            present.add(name)
            start = known.get(name, 0)
            if size <= start:
                continue
            try:
                fd = _open_pack(self.directory / name)
            except OSError:  # gone (collected), or not a pack file (a link)
                present.discard(name)
                continue
            try:
                records, end = read_records(fd, start, os.fstat(fd).st_size)
            except OSError as exc:  # a bad block: this pack is read again next time
                log.warning("blob pack unreadable", extra={"pack": name, "error": repr(exc)})
                continue
            finally:
                os.close(fd)
            for first in range(0, max(len(records), 1), _BATCH):
                batch = records[first : first + _BATCH]
                last = batch[-1] if batch else None
                upto = (
                    end
                    if first + _BATCH >= len(records) or last is None
                    else last.offset + HEADER.size + last.size
                )
                with write_transaction(db):
                    db.executemany(
                        "INSERT OR IGNORE INTO records (sha256, pack, offset, size) "
                        "VALUES (?, ?, ?, ?)",
                        [(bytes.fromhex(r.sha256), name, r.offset, r.size) for r in batch],
                    )
                    db.execute(
                        "INSERT INTO packs (name, indexed_to) VALUES (?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET indexed_to = max(indexed_to, excluded.indexed_to)",
                        (name, upto),
                    )
        for gone in known.keys() - present:
            self.forget(gone, db)

    def forget(self, name: str, db: sqlite3.Connection | None = None) -> None:
        """A pack about to be deleted: its rows go first (a reader then looks again)."""
        if db is None:
            with self._lock:
                try:
                    self._forget(self._connect(), name)
                except sqlite3.Error as exc:
                    raise self._failed(exc) from exc
        else:
            self._forget(db, name)

    @staticmethod
    def _forget(db: sqlite3.Connection, name: str) -> None:
        with write_transaction(db):
            db.execute("DELETE FROM records WHERE pack = ?", (name,))
            db.execute("DELETE FROM packs WHERE name = ?", (name,))


def _open_pack(path: Path) -> int:
    """A descriptor on the regular file ``path`` (OSError for a link, a FIFO, a
    directory: nothing but a writer's pack is ever read)."""
    fd = os.open(path, _READ | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        after a collection moved it (its old pack gone: its rows are gone first). When
        the index cannot answer, the packs are read instead, newest first."""
        if not SHA256_HEX.match(sha256) or not self.directory.is_dir():
            return None
        listed = False
        try:
            for attempt in range(3):
                for pack, offset, size in self.index.lookup(sha256):
                    listed = True
                    data = read_blob(self.directory / pack, offset, size, sha256)
                    if data is not None:
                        return data
                if attempt < 2:
                    self.index.catch_up()
        except IndexUnavailable as exc:
            log.warning("blob pack index unavailable, packs read", extra={"error": str(exc)})
            return self.scan_for(sha256)
        # Listed, yet no row led to it: the rows are wrong (a cache), the packs are not.
        return self.scan_for(sha256) if listed else None

    def scan_for(self, sha256: str) -> bytes | None:
        """``sha256`` from the packs themselves, without the index (slow: every header)."""
        for name, _size in sorted(_pack_files(self.directory), reverse=True):
            try:
                records = records_of(self.directory / name)
            except OSError:  # gone, not a pack file, or a bad block
                continue
            for record in records:
                if record.sha256 == sha256:
                    data = read_blob(self.directory / name, record.offset, record.size, sha256)
                    if data is not None:
                        return data
        return None

    def close(self) -> None:
        self.writer.close()
        self.index.close()


def read_all_records(fd: int, size: int) -> tuple[list[Record], int, bool]:
    """Every record of a pack no one appends to any more, each verified against its
    digest; how many bytes could not be read as records; and whether records follow
    a damaged stretch (not only a torn end). Past a damaged stretch (a torn append, a
    bad block, a flipped bit in a size) the next record whose bytes match its digest
    is looked for, and reading goes on from it."""
    records: list[Record] = []
    damaged = 0
    after_damage = False
    offset = 0
    while offset < size:
        record = _record_at(fd, offset, size)
        if record is not None:
            if damaged:
                after_damage = True
            records.append(record)
            offset += HEADER.size + record.size
            continue
        found = _next_record(fd, offset + 1, size)
        if found is None:
            damaged += size - offset
            break
        damaged += found - offset
        offset = found
    return records, damaged, after_damage


def _record_at(fd: int, offset: int, size: int) -> Record | None:
    """The record at ``offset`` if it is whole and its bytes match its digest."""
    header = _header_at(fd, offset, size)
    if header is None:
        return None
    digest, length = header
    body = os.pread(fd, length, offset + HEADER.size)
    if hashlib.sha256(body).digest() != digest:
        return None
    return Record(digest.hex(), offset, length)


def _next_record(fd: int, start: int, size: int) -> int | None:
    """Where the first whole, verified record at or after ``start`` begins. A candidate
    is hashed only when it ends where the pack ends or another header begins, so
    bytes crafted to look like headers cost little."""
    chunk = 1024 * 1024
    position = start
    while position < size:
        data = os.pread(fd, min(chunk + HEADER.size, size - position), position)
        if not data:
            return None
        at = data.find(MAGIC)
        while 0 <= at < chunk:
            offset = position + at
            header = _header_at(fd, offset, size)
            if header is not None:
                end = offset + HEADER.size + header[1]
                if (end == size or os.pread(fd, len(MAGIC), end) == MAGIC) and _record_at(
                    fd, offset, size
                ) is not None:
                    return offset
            at = data.find(MAGIC, at + 1)
        position += chunk
    return None


@dataclass
class _OldPack:
    name: str
    digests: set[str]  # from its headers
    whole: bool  # every byte a record, each digest once


#: A new pack's dot name older than this belongs to a writer that died before
#: renaming it (no blob in it was ever acknowledged).
STALE_NEW_S = 3600.0


def collect_packs(
    store: FileBlobStore,
    packs: Packs,
    references: Sequence[References],
    cutoff: float,
    report: GcReport,
    *,
    dry_run: bool,
) -> None:
    """Collect the packs untouched since ``cutoff`` (see the module's text). Each
    table is asked once for the blobs of all of them. A pack that cannot be read (a
    bad block) is logged and left for the next collection."""
    with contextlib.suppress(IndexUnavailable):  # the packs are read either way
        packs.index.catch_up()
    old: list[_OldPack] = []
    for name, _size in sorted(_pack_files(packs.directory)):
        try:
            found = _look_at(packs, name, cutoff, report)
        except OSError as exc:
            log.error("blob pack unreadable, left", extra={"pack": name, "error": repr(exc)})
            continue
        if found is not None:
            old.append(found)
    digests = set().union(*(pack.digests for pack in old))
    referenced: set[str] = set()
    if digests:
        for find in references:
            referenced |= find(digests)
    doomed: set[str] = set()  # the packs this collection deletes (or, dry, would)
    for pack in old:
        if pack.whole and pack.digests and pack.digests <= referenced:
            # All still needed: left as it is, looked at again next time.
            report.scanned += len(pack.digests)
            report.referenced += len(pack.digests)
            continue
        try:
            _collect_pack(
                store,
                packs,
                pack,
                referenced=referenced,
                report=report,
                doomed=doomed,
                dry_run=dry_run,
            )
        except OSError as exc:
            log.error("blob pack not collected", extra={"pack": pack.name, "error": repr(exc)})
    if not dry_run:
        _remove_stale_new(packs.directory)


def _look_at(packs: Packs, name: str, cutoff: float, report: GcReport) -> _OldPack | None:
    """An old pack no writer holds, from its headers; a young one only counted."""
    try:
        fd = _open_pack(packs.directory / name)
    except OSError:  # gone (collected), or not a pack file (a link, a FIFO)
        return None
    try:
        info = os.fstat(fd)
        young = info.st_mtime >= cutoff
        if not young:
            try:
                # Not while a writer may append to it (it holds a shared lock), nor
                # while another collector takes it.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                young = True
        if young:
            counted = _count(packs, name, fd)
            report.scanned += counted
            report.young += counted
            return None
        if info.st_nlink == 0:
            return None  # deleted by another collector meanwhile
        records, end = read_records(fd, 0, info.st_size)
        digests = {r.sha256 for r in records}
        return _OldPack(name, digests, end == info.st_size and len(digests) == len(records))
    finally:
        os.close(fd)  # and its lock: taken again before anything is changed


def _remove_stale_new(directory: Path) -> None:
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(SUFFIX + NEW_SUFFIX)):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= now - STALE_NEW_S:
                continue
            fd = os.open(entry.path, _READ | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
        except OSError:
            pass  # its writer is alive (it holds the lock), or it is gone
        finally:
            os.close(fd)


def _count(packs: Packs, name: str, fd: int) -> int:
    try:
        return packs.index.count(name)
    except IndexUnavailable:
        records, _end = read_records(fd, 0, os.fstat(fd).st_size)
        return len({r.sha256 for r in records})


def _collect_pack(
    store: FileBlobStore,
    packs: Packs,
    old: _OldPack,
    *,
    referenced: set[str],
    report: GcReport,
    doomed: set[str],
    dry_run: bool,
) -> None:
    """One old pack: what is referenced is written again, the pack deleted; or, with
    records past a damaged stretch, set aside under a dot name (never read again)."""
    path = packs.directory / old.name
    try:
        fd = _open_pack(path)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another collector has it
        info = os.fstat(fd)
        if info.st_nlink == 0:
            return
        records, damaged, after_damage = read_all_records(fd, info.st_size)
        digests = {r.sha256: r for r in records}
        report.scanned += len(digests)
        # A record the headers hid (behind a damaged size) was not asked about: kept.
        live = {d: r for d, r in digests.items() if d in referenced or d not in old.digests}
        report.referenced += len(live)
        dropped = [(d, r.size) for d, r in digests.items() if d not in live]
        kept = [
            Blob.of(os.pread(fd, r.size, r.offset + HEADER.size), "application/octet-stream")
            for r in live.values()
        ]
        if any(b.ref.sha256 not in live for b in kept):  # changed under the lock: a bad disk
            log.error("blob pack changed while collected, left", extra={"pack": old.name})
            return
        if damaged:
            log.warning(
                "blob pack had unreadable bytes",
                extra={"pack": old.name, "damaged_bytes": damaged, "records": len(records)},
            )
        doomed.add(old.name)
        gone = [(d, size) for d, size in dropped if not _elsewhere(packs, d, doomed)]
        report.deleted.extend(gone)
        if dry_run:
            return
        if kept:
            store.put_many(kept)  # young again, in this process's pack, synced
        with contextlib.suppress(IndexUnavailable):  # readers then find it gone
            packs.index.forget(old.name)  # readers look again, and find the copies
        if after_damage:
            # Damage with records after it is not a torn append: kept for whoever
            # looks into the disk, out of readers' and collectors' way.
            os.rename(path, packs.directory / f".damaged-{old.name}")
            log.error("blob pack damaged, set aside", extra={"pack": old.name})
        else:
            path.unlink()
        fsync_dir(packs.directory)
    finally:
        os.close(fd)


def _elsewhere(packs: Packs, sha256: str, doomed: set[str]) -> bool:
    """Whether a pack this collection keeps holds ``sha256`` too (then dropping this
    copy deletes nothing: it is not reported deleted)."""
    try:
        rows = packs.index.lookup(sha256)
    except IndexUnavailable:
        return False
    return any(
        pack not in doomed and (packs.directory / pack).exists() for pack, _offset, _size in rows
    )
