"""switchboard.sqlitefile: the spool's, the journal's, the archive buffer's and the
packs' one way to open and write their SQLite files, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from switchboard.sqlitefile import open_durable, read_only, write_transaction


def _rows(db: sqlite3.Connection) -> list[int]:
    return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]


def test_a_block_that_raises_leaves_nothing_and_the_next_write_works(tmp_path: Path) -> None:
    db = open_durable(tmp_path / "f.sqlite3")
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")

    def half_way() -> None:
        with write_transaction(db):
            db.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError):
        half_way()
    assert not db.in_transaction
    with write_transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
    assert _rows(db) == [2]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    db.close()


def test_a_commit_that_fails_is_rolled_back_not_left_open(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT, where SQLite keeps the transaction
    open: the next BEGIN would fail with it. The failed commit's rows are gone."""
    db = open_durable(tmp_path / "f.sqlite3")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE t (n INTEGER PRIMARY KEY,"
        " p INTEGER REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    with pytest.raises(sqlite3.IntegrityError), write_transaction(db):
        db.execute("INSERT INTO t VALUES (1, 99)")
    assert not db.in_transaction
    with write_transaction(db):
        db.execute("INSERT INTO t VALUES (2, NULL)")
    assert _rows(db) == [2]
    db.close()


def test_another_process_reads_what_was_committed_read_only(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    db = open_durable(path)
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    with write_transaction(db):
        db.execute("INSERT INTO t VALUES (7)")
    with read_only(path) as reader:
        assert _rows(reader) == [7]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("INSERT INTO t VALUES (8)")
    db.close()
