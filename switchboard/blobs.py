"""Content-addressed blob store: raw MIME and attachments, by SHA-256 (claim check).

Events carry :class:`normalize.schema.BlobRef` references and stay small. The
filesystem store is the default; the :class:`BlobStore` protocol is what an S3
(or other) store implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import logging
import os
import platform
import re
import secrets
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from normalize.content import Blob
from normalize.schema import BlobRef
from switchboard.files import fsync_dir, fsync_file, made_dirs, make_dirs
from switchboard.metrics import BLOB_TEMPORARIES_REMOVED, BLOBS_COLLECTED
from switchboard.packs import ROTATE_AGE_S, ROTATE_BYTES, SHA256_HEX, Packs, collect_packs

_SHA256 = SHA256_HEX
#: A blob this large is written and fsynced on its own, not in a group's sync.
BIG_BLOB = 1024 * 1024
#: How a blob's temporary file (before its rename) starts: `blobs gc` knows them by it.
_TMP_PREFIX = ".tmp-"
#: The lock file (in the store's root) that orders renewals against `blobs gc`.
_GC_LOCK = ".gc.lock"
#: A BlobRef inside serialized JSON (an event's data, a read model's column).
BLOB_REF = re.compile(rb'"sha256"\s*:\s*"([0-9a-f]{64})"')

log = logging.getLogger(__name__)


class BlobNotFound(KeyError):
    """No blob with that digest."""


def _syncfs_call() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)``, when it reports every failure: write-back errors since
    Linux 5.8, and the file system's own sync (its journal: what makes renames and
    new directory entries durable) since 5.17. Before, it could return 0 after a
    failure, so it cannot vouch for anything there."""
    if sys.platform != "linux":
        return None
    numbers = re.match(r"(\d+)\.(\d+)", platform.release())
    if numbers is None or (int(numbers[1]), int(numbers[2])) < (5, 17):
        return None
    try:
        # ctypes: the call is one system call the standard library does not wrap; a
        # CDLL function releases the GIL while it runs.
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return call


_SYNCFS = _syncfs_call()


def _sync_file_system(fd: int) -> None:
    if _SYNCFS is None:
        raise OSError("syncfs is not available")
    if _SYNCFS(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class BlobStore(Protocol):
    def put(self, blob: Blob) -> BlobRef:
        """Store durably (idempotent: the same bytes are stored once)."""

    def put_many(self, blobs: Sequence[Blob]) -> None:
        """Store several durably (the blobs of concurrent messages); raises OSError if
        any was not stored, and then none of them may be reported stored."""

    def get(self, sha256: str) -> bytes:
        """The stored bytes; raises :class:`BlobNotFound`."""

    def exists(self, sha256: str) -> bool: ...

    def close(self) -> None:
        """Let go of open files (a writer's pack); the store may not be written after."""


class FileBlobStore:
    """Blobs as files ``root/ab/cd/abcd...``, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[Path] = set()  # directories known to exist, their entries durable
        # Digests whose last write here failed after its rename: the file is in place
        # but not known durable (and after a failed write-back the kernel may report
        # its pages clean), so it is written again rather than trusted.
        self._suspect: set[str] = set()
        self._token = secrets.token_hex(6)  # temporary files' names (_write_tmp)
        self._tmp_names = itertools.count()

    def _write_tmp(self, directory: Path, data: bytes, *, fsync: bool) -> str:
        """``data`` in a new temporary file in ``directory`` (fsynced if asked); its path.

        Named from this store's random token and a counter rather than by
        ``tempfile.mkstemp`` (which draws a name in Python and wraps the descriptor
        in a buffered file: three more system calls a blob), and written with
        plain ``os.write``; a name that exists anyway falls back to ``mkstemp``."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{self._token}-{next(self._tmp_names)}")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise BlobNotFound(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    @contextlib.contextmanager
    def _gc_lock(self, mode: int) -> Iterator[None]:
        """``flock`` on the root's lock file: shared while a blob found in place is
        renewed, exclusive while `blobs gc` checks a blob's age and deletes it (any
        process). Each holder opens the file itself: a lock belongs to an open file,
        and threads sharing one would release each other's. Only taken where a blob
        was just found, so the root exists (FileNotFoundError if it went meanwhile)."""
        fd = os.open(self.root / _GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _stored(self, blob: Blob, path: Path) -> bool:
        """True when the blob is already here (at ``path``); its age is then renewed."""
        if blob.ref.sha256 in self._suspect:
            return False
        try:
            found = os.stat(path)  # one call: is_file() and stat() were two
        except FileNotFoundError:
            return False
        if not (stat.S_ISREG(found.st_mode) and found.st_size == blob.ref.size):
            return False
        # Its age is what `blobs gc` reads: a blob stored again for a new message is
        # as young as that message, however old the file. Renewed under the shared
        # lock, so a collection's age check and delete (under the exclusive one)
        # come wholly before (the renewal finds no file: written again) or wholly
        # after (the collection finds it young: kept). Without it, a delete could
        # land between this renewal and the message's publication.
        try:
            with self._gc_lock(fcntl.LOCK_SH):
                os.utime(path)
        except FileNotFoundError:
            return False  # collected meanwhile: written again
        return True

    def put(self, blob: Blob) -> BlobRef:
        path = self._path(blob.ref.sha256)
        if self._stored(blob, path):
            # Another thread or process may have renamed it there a moment ago and
            # not yet synced its bytes or its directory entry: trusted once both are.
            try:
                make_dirs(path.parent, self.root, self._dirs)  # its levels, likewise
                fsync_file(path)
                fsync_dir(path.parent)
            except FileNotFoundError:
                pass  # collected meanwhile: written below
            except OSError:
                # After a failed write-back the kernel may call its pages clean: a
                # later sync would pass without writing them. Written again next time.
                self._suspect.add(blob.ref.sha256)
                raise
            else:
                return blob.ref
        make_dirs(path.parent, self.root, self._dirs)
        tmp = self._write_tmp(path.parent, blob.data, fsync=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is on disk.
        try:
            fsync_dir(path.parent)
        except BaseException:
            self._suspect.add(blob.ref.sha256)
            raise
        self._suspect.discard(blob.ref.sha256)
        return blob.ref

    def put_many(self, blobs: Sequence[Blob]) -> None:
        """Store the blobs of several messages at once: on Linux (5.17 and later) with
        two ``syncfs`` calls for all of them, one after the files are written and one
        after they are renamed into place, instead of two fsyncs each (a file and its
        directory): the group commit of concurrent messages (``ingest.groupcommit``).

        A blob found already in place still gets a ``syncfs`` before this returns:
        another write (a thread or a process) may have renamed it there a moment ago
        and not yet made the rename durable. Blobs of :data:`BIG_BLOB` bytes or more
        are written and fsynced one by one first (:meth:`put`), so the group's sync
        has little of theirs left to write back.

        ``syncfs`` writes back everything dirty on the blobs' file system, so the
        blobs want a file system where nothing else leaves much unsynced data (the
        default data directory holds the spool, the journal and SQLite, which fsync
        their own writes). Elsewhere, :meth:`put`'s fsyncs, one blob after the other.
        Raises OSError if any blob was not stored durably."""
        if _SYNCFS is None:
            for blob in {b.ref.sha256: b for b in blobs}.values():
                self.put(blob)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # Opened before anything is looked at or written: syncfs reports the file
        # system's write-back errors since this descriptor was opened.
        barrier = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        pending: list[tuple[str, Path]] = []
        renamed: list[str] = []
        try:
            new: dict[str, tuple[Blob, Path]] = {}
            for blob in blobs:
                path = self._path(blob.ref.sha256)
                if not self._stored(blob, path):
                    new[blob.ref.sha256] = (blob, path)
            for digest in [d for d, (b, _) in new.items() if b.ref.size >= BIG_BLOB]:
                self.put(new.pop(digest)[0])
            levels: set[Path] = set()  # new directories, made durable by the first sync
            for blob, path in new.values():
                levels.update(made_dirs(path.parent, self.root, self._dirs))
                pending.append((self._write_tmp(path.parent, blob.data, fsync=False), path))
            if new:
                _sync_file_system(barrier)  # every file's bytes, every new directory's entry
                self._dirs.update(levels)
            for (tmp, path), digest in zip(list(pending), new, strict=True):
                renamed.append(digest)
                os.replace(tmp, path)  # on failure, the ones not yet renamed are removed
            pending.clear()
            # Every rename's directory entry, and whatever another write renamed into
            # place that this one found there.
            _sync_file_system(barrier)
        except BaseException:
            self._suspect.update(renamed)
            raise
        else:
            self._suspect.difference_update(renamed)
        finally:
            os.close(barrier)
            for tmp, _ in pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def get(self, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc

    def close(self) -> None:
        """Nothing is held open between writes."""

    def scan(
        self, temporaries: list[tuple[Path, float, int]] | None = None
    ) -> Iterator[tuple[str, float, int]]:
        """Every stored blob as (sha256, modification time, size); with
        ``temporaries``, the temporary files met on the way are added to it as (path,
        modification time, size): a write that died before its rename leaves one."""
        if not self.root.is_dir():
            return
        for first in os.scandir(self.root):
            if not first.is_dir() or len(first.name) != 2:
                continue
            for second in os.scandir(first.path):
                if not second.is_dir():
                    continue
                for entry in os.scandir(second.path):
                    if _SHA256.match(entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            info = entry.stat()
                            yield entry.name, info.st_mtime, info.st_size
                    elif temporaries is not None and entry.name.startswith(_TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            info = entry.stat()
                            temporaries.append((Path(entry.path), info.st_mtime, info.st_size))

    def delete_if_older(self, sha256: str, cutoff: float) -> bool:
        """Delete the blob unless it was (re)written at or after ``cutoff`` (Unix time).

        Checked again right before the unlink, both under the exclusive lock: a
        put() renewing it (under the shared one) cannot land in between."""
        path = self._path(sha256)
        try:
            with self._gc_lock(fcntl.LOCK_EX):
                if path.stat().st_mtime >= cutoff:
                    return False
                path.unlink()
        except FileNotFoundError:
            return False
        return True


class PackBlobStore(FileBlobStore):
    """Blobs under :data:`BIG_BLOB` appended to this process's packs
    (:mod:`switchboard.packs`): one ``writev`` and a shared ``fdatasync`` a group
    instead of a file, a rename and two file-system syncs. Big blobs stay files
    (:meth:`FileBlobStore.put`, fsynced on their own), and blobs a store of the
    file layout wrote are read and collected as before: a data directory can move
    from ``layout = "files"`` to packs and back (what packs hold stays in packs)."""

    def __init__(
        self,
        root: Path,
        *,
        rotate_bytes: int = ROTATE_BYTES,
        rotate_age_s: float = ROTATE_AGE_S,
    ) -> None:
        super().__init__(root)
        self.packs = Packs(root, self._dirs, rotate_bytes=rotate_bytes, rotate_age_s=rotate_age_s)

    def put(self, blob: Blob) -> BlobRef:
        self._open()
        if blob.ref.size >= BIG_BLOB:
            return super().put(blob)
        self.put_many([blob])
        return blob.ref

    def put_many(self, blobs: Sequence[Blob]) -> None:
        self._open()
        unique = {b.ref.sha256: b for b in blobs}
        for digest in unique:
            if not _SHA256.match(digest):
                raise ValueError(f"not a SHA-256 digest: {digest!r}")
        small = [b for b in unique.values() if b.ref.size < BIG_BLOB]
        for blob in unique.values():
            if blob.ref.size >= BIG_BLOB:
                super().put(blob)
        if small:
            self.packs.put(small)

    def get(self, sha256: str) -> bytes:
        try:
            return super().get(sha256)  # big, or written as a file before packs
        except BlobNotFound:
            pass
        data = self.packs.get(sha256)
        if data is None:
            raise BlobNotFound(sha256)
        return data

    def exists(self, sha256: str) -> bool:
        if not _SHA256.match(sha256):
            return False
        return super().exists(sha256) or self.packs.get(sha256) is not None

    def _open(self) -> None:
        if self.packs.writer.closed:
            raise OSError("the blob store is closed")

    def close(self) -> None:
        self.packs.close()


def open_blob_store(root: Path, layout: str) -> FileBlobStore:
    """The store of ``[blobs] layout``: ``packs`` (the default) or ``files``."""
    if layout == "files":
        return FileBlobStore(root)
    if layout == "packs":
        return PackBlobStore(root)
    raise ValueError(f"unknown blob layout {layout!r}")


#: Which of these digests a store still references (router events, queue attachments).
References = Callable[[Collection[str]], set[str]]


#: The least age of a temporary blob file that `blobs gc` removes (see GcReport).
STALE_TEMPORARY_S = 3600.0


@dataclass
class GcReport:
    """What one collection found and did (or, dry, would do)."""

    scanned: int = 0
    young: int = 0
    referenced: int = 0
    deleted: list[tuple[str, int]] = field(default_factory=list)
    #: Temporary files of writes that died before their rename (a crash, a kill):
    #: (name, size), removed once an hour old (STALE_TEMPORARY_S).
    temporaries: list[tuple[str, int]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.deleted)


def collect_garbage(
    store: FileBlobStore,
    references: Sequence[References],
    retention: timedelta,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Delete blobs older than ``retention`` that no store references.

    A younger blob is never deleted, referenced or not: its message may still be
    in the spool, on Kafka or in a router batch, not yet in any table.
    """
    now = time.time() if now is None else now
    cutoff = now - retention.total_seconds()
    report = GcReport(dry_run=dry_run)
    old: dict[str, int] = {}
    temporaries: list[tuple[Path, float, int]] = []
    for sha256, mtime, size in store.scan(temporaries):
        report.scanned += 1
        if mtime >= cutoff:
            report.young += 1
        else:
            old[sha256] = size
    if old:  # the tables are read only when something could go
        referenced: set[str] = set()
        for find in references:
            referenced |= find(old.keys())
        report.referenced = len(referenced & old.keys())
        for sha256, size in old.items():
            if sha256 in referenced:
                continue
            if dry_run or store.delete_if_older(sha256, cutoff):
                report.deleted.append((sha256, size))
    if isinstance(store, PackBlobStore):
        collect_packs(store, store.packs, references, cutoff, report, dry_run=dry_run)
    _remove_stale_temporaries(temporaries, now, report, dry_run=dry_run)
    return report


def _remove_stale_temporaries(
    temporaries: list[tuple[Path, float, int]], now: float, report: GcReport, *, dry_run: bool
) -> None:
    # No write takes an hour: a temporary file that old belongs to a dead writer (it
    # is no message's blob: the retention, which waits for messages, does not apply).
    stale = now - STALE_TEMPORARY_S
    for path, mtime, size in temporaries:
        if mtime >= stale:
            continue
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
        report.temporaries.append((path.name, size))


class BlobCollector:
    """``blobs gc`` every ``interval_s`` inside ``switchboard run`` (a component)."""

    name = "blob-gc"
    edge = False

    def __init__(
        self,
        store: FileBlobStore,
        references: Sequence[References],
        retention: timedelta,
        interval_s: float,
    ) -> None:
        self.store = store
        self.references = references
        self.retention = retention
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            # First run one interval after start: a restart loop does not rescan.
            await asyncio.sleep(self.interval_s)
            try:
                report = await asyncio.to_thread(
                    collect_garbage, self.store, self.references, self.retention
                )
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                log.warning("blob collection failed", extra={"error": repr(exc)})
                continue
            BLOBS_COLLECTED.inc(len(report.deleted))
            BLOB_TEMPORARIES_REMOVED.inc(len(report.temporaries))
            log.info(
                "blobs collected",
                extra={
                    "scanned": report.scanned,
                    "deleted": len(report.deleted),
                    "temporaries_removed": len(report.temporaries),
                    "bytes_freed": report.bytes_freed,
                    "referenced": report.referenced,
                    "young": report.young,
                },
            )
