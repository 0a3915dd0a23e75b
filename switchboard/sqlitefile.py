"""The small SQLite files a process keeps durable state in (the spool, the journal,
the archive's buffer, the packs' index): opened, written and read for status one way.

A connection is in autocommit mode (``isolation_level=None``): every write that must
be atomic is an explicit :func:`write_transaction`, which takes the file's write lock
up front (``BEGIN IMMEDIATE``) rather than at its first write, so two writers wait on
``busy_timeout`` instead of one failing on a lock it cannot upgrade.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def open_durable(path: Path) -> sqlite3.Connection:
    """A connection whose every commit is on disk before it returns: WAL, fsynced at
    each commit (``synchronous=FULL``), waiting up to 5 s for another writer of the
    same file. Usable from any thread; the caller serializes its statements."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit
        db.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back when it
    raises or when the commit itself fails (a commit that failed leaves no open
    transaction behind to break the next one; one SQLite already rolled back is not
    rolled back again, which would hide the first error behind a second)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to ``path`` (from another process: `switchboard status`),
    closed when the block ends."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()
