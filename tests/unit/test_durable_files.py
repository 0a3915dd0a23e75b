"""Files the pipeline reports as safe: what is fsynced, and in which order."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from normalize.content import Blob
from sinks.archive_files import LocalArchive, Part
from switchboard import blobs
from switchboard.blobs import FileBlobStore
from switchboard.files import make_dirs


def _recording(
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    name: str,
    entry: Callable[..., str],
    log: list[str] | None = None,
) -> list[str]:
    """``owner.name`` wrapped so that each call first appends ``entry(*args)`` to
    ``log``; the real call still runs."""
    calls: list[str] = [] if log is None else log
    real = getattr(owner, name)

    def call(*args: Any) -> Any:  # noqa: ANN401 - whatever the wrapped call takes
        calls.append(entry(*args))
        return real(*args)

    monkeypatch.setattr(owner, name, call)
    return calls


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return _recording(monkeypatch, os, "fsync", _path_of)


def test_new_fan_out_directories_are_made_durable_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "blobs"
    store = FileBlobStore(root)
    synced = _record_fsyncs(monkeypatch)
    blob = Blob.of(b"hello", "text/plain")
    store.put(blob)
    digest = blob.ref.sha256
    first, second = root / digest[:2], root / digest[:2] / digest[2:4]
    assert (second / digest).read_bytes() == b"hello"
    # Each new level's entry in its parent, the file, then its rename.
    assert synced[:3] == [str(tmp_path), str(root), str(first)]
    assert synced[3].startswith(str(second / ".tmp-"))
    assert synced[4:] == [str(second)]


def test_a_directory_met_once_costs_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    blob = Blob.of(b"one", "text/plain")
    store.put(blob)
    synced = _record_fsyncs(monkeypatch)
    store.put(blob)
    path = tmp_path / blob.ref.sha256[:2] / blob.ref.sha256[2:4] / blob.ref.sha256
    # Already stored: nothing written, only the file and its entry synced again.
    assert synced == [str(path), str(path.parent)]
    synced.clear()
    path.unlink()  # collected meanwhile: written again, into a directory already met
    store.put(blob)
    assert len(synced) == 2
    assert synced[1] == str(path.parent)


def test_a_directory_someone_else_just_made_is_still_synced_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkdir cannot tell "made a moment ago by another process, parent not yet
    fsynced" from "made long ago": the first meeting syncs the parent either way."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    synced = _record_fsyncs(monkeypatch)
    make_dirs(tmp_path / "a" / "b", tmp_path, set())
    assert synced == [str(tmp_path.parent), str(tmp_path), str(tmp_path / "a")]


def test_make_dirs_from_many_threads_at_once(tmp_path: Path) -> None:
    known: set[Path] = set()
    target = tmp_path / "x" / "y" / "z"
    errors: list[BaseException] = []

    def make() -> None:
        try:
            make_dirs(target, tmp_path, known)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.is_dir()
    with pytest.raises(ValueError, match="not under"):
        make_dirs(Path("/elsewhere"), tmp_path, known)


def test_an_archive_file_on_a_new_day_survives_with_its_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = LocalArchive(tmp_path / "archive")
    synced = _record_fsyncs(monkeypatch)
    part = Part("switchboard.inbound.v1", "2026-11-29", 0, 0, 9)
    archive.write(part, b"PAR1...")
    topic = tmp_path / "archive" / "topic=switchboard.inbound.v1"
    day = topic / "date=2026-11-29"
    assert (day / part.name).read_bytes() == b"PAR1..."
    assert synced[:3] == [str(tmp_path), str(tmp_path / "archive"), str(topic)]
    assert synced[3] == str(day / f".{part.name}.tmp")
    assert synced[4:] == [str(day)]


def _need_syncfs() -> None:
    if blobs._SYNCFS is None:
        pytest.skip("no syncfs that reports every failure here (Linux 5.17 and later)")


def _record_syncfs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every syncfs call of the blob store (the real one runs), with its path."""
    _need_syncfs()
    return _recording(monkeypatch, blobs, "_SYNCFS", _path_of)


def test_many_blobs_share_two_file_system_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "blobs"
    store = FileBlobStore(root)
    old = Blob.of(b"stored before", "text/plain")
    store.put(old)
    old_path = root / old.ref.sha256[:2] / old.ref.sha256[2:4] / old.ref.sha256
    os.utime(old_path, (1, 1))
    fsyncs, syncfs = _record_fsyncs(monkeypatch), _record_syncfs(monkeypatch)
    many = [Blob.of(f"message {i}".encode(), "text/plain") for i in range(50)]
    store.put_many([*many, many[0], old])  # a repeat and a blob already stored
    # Two syncs for all of them, new directories included: the bytes, then the renames.
    assert syncfs == [str(root), str(root)]
    assert fsyncs == []
    for blob in many:
        assert store.get(blob.ref.sha256) == blob.data
    assert old_path.stat().st_mtime > 1  # stored again: as young as its new message
    assert not list(root.rglob(".tmp-*"))
    # The new directories are known durable now: a blob written into one again
    # costs its file and its entry, not the directory's own entry in its parent.
    first = root / many[0].ref.sha256[:2] / many[0].ref.sha256[2:4] / many[0].ref.sha256
    first.unlink()
    store.put(many[0])
    assert len(fsyncs) == 2
    assert fsyncs[1] == str(first.parent)


def test_a_failed_sync_stores_nothing_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    monkeypatch.setattr(blobs, "_SYNCFS", lambda _fd: -1)
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EIO)
    batch = [Blob.of(f"lost {i}".encode(), "text/plain") for i in range(3)]
    with pytest.raises(OSError, match="Input/output error"):
        store.put_many(batch)
    for blob in batch:
        assert not store.exists(blob.ref.sha256)  # never under its digest unless synced
    assert not list(tmp_path.rglob(".tmp-*"))


def test_without_syncfs_each_blob_gets_its_own_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    store.put(Blob.of(b"warm", "text/plain"))
    monkeypatch.setattr(blobs, "_SYNCFS", None)
    synced = _record_fsyncs(monkeypatch)
    a, b = Blob.of(b"a", "text/plain"), Blob.of(b"b", "text/plain")
    store.put_many([a, b])
    assert store.get(a.ref.sha256) == b"a"
    assert store.get(b.ref.sha256) == b"b"
    files = [path for path in synced if "/.tmp-" in path]
    assert len(files) == 2  # each file fsynced before its rename


def test_without_syncfs_a_blob_found_in_place_is_synced_before_it_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may have renamed it there a moment ago: its bytes and its
    directory entry are synced before this write reports it stored."""
    monkeypatch.setattr(blobs, "_SYNCFS", None)
    blob = Blob.of(b"renamed by someone else", "text/plain")
    FileBlobStore(tmp_path).put(blob)  # another process's store
    store = FileBlobStore(tmp_path)
    synced = _record_fsyncs(monkeypatch)
    store.put_many([blob])
    path = tmp_path / blob.ref.sha256[:2] / blob.ref.sha256[2:4] / blob.ref.sha256
    assert str(path) in synced
    assert str(path.parent) in synced
    assert not [p for p in synced if "/.tmp-" in p]  # trusted, not written again


def test_without_syncfs_a_failed_sync_of_a_blob_found_in_place_means_a_rewrite_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed write-back the kernel may call the pages clean, so a second
    sync would pass without writing them: the blob is written again instead."""
    monkeypatch.setattr(blobs, "_SYNCFS", None)
    blob = Blob.of(b"renamed by someone else, then a disk error", "text/plain")
    FileBlobStore(tmp_path).put(blob)  # another process's store
    store = FileBlobStore(tmp_path)

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as failing_disk:
        failing_disk.setattr(blobs, "fsync_file", failing)
        with pytest.raises(OSError, match="Input/output error"):
            store.put_many([blob])
    synced = _record_fsyncs(monkeypatch)
    store.put_many([blob])
    assert [p for p in synced if "/.tmp-" in p]  # written again, not trusted
    assert store.get(blob.ref.sha256) == blob.data


def _record_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """syncfs and rename calls of the blob store, in order (the real ones run)."""
    _need_syncfs()
    order = _recording(monkeypatch, blobs, "_SYNCFS", lambda _fd: "sync")
    return _recording(
        monkeypatch, os, "replace", lambda _src, dst: f"rename {Path(dst).name[:8]}", order
    )


def test_the_bytes_are_synced_before_the_renames_and_the_renames_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    order = _record_order(monkeypatch)
    batch = [Blob.of(f"ordered {i}".encode(), "text/plain") for i in range(3)]
    store.put_many(batch)
    assert order[0] == "sync"
    assert sorted(order[1:4]) == sorted(f"rename {b.ref.sha256[:8]}" for b in batch)
    assert order[4:] == ["sync"]


def test_a_blob_found_in_place_is_still_synced_before_it_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another write may have renamed it there a moment ago, its rename not yet durable."""
    store = FileBlobStore(tmp_path)
    blob = Blob.of(b"renamed by someone else", "text/plain")
    FileBlobStore(tmp_path).put(blob)  # another process's store
    order = _record_order(monkeypatch)
    store.put_many([blob])
    assert order == ["sync"]


def test_after_a_failed_second_sync_the_blobs_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    order = _record_order(monkeypatch)
    recording = blobs._SYNCFS
    calls = iter([0, -1])  # the bytes' sync works, the renames' sync fails

    def flaky(fd: int) -> int:
        assert recording is not None
        recording(fd)
        return next(calls, 0)

    monkeypatch.setattr(blobs, "_SYNCFS", flaky)
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EIO)
    batch = [Blob.of(f"half {i}".encode(), "text/plain") for i in range(2)]
    with pytest.raises(OSError, match="Input/output error"):
        store.put_many(batch)
    # In place, but not known durable: the sender's retry must not be trusted to them.
    order.clear()
    store.put_many(batch)
    renames = sorted(f"rename {b.ref.sha256[:8]}" for b in batch)
    assert order[0] == "sync"
    assert sorted(order[1:3]) == renames  # written and renamed again
    assert order[3:] == ["sync"]
    order.clear()
    store.put_many(batch)  # durable now: trusted, and synced once
    assert order == ["sync"]


def test_a_big_blob_gets_its_own_fsync_before_the_group_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    store.put(Blob.of(b"warm", "text/plain"))
    fsyncs, syncfs = _record_fsyncs(monkeypatch), _record_syncfs(monkeypatch)
    big = Blob.of(b"x" * blobs.BIG_BLOB, "application/pdf")
    small = Blob.of(b"small", "text/plain")
    store.put_many([big, small])
    assert store.get(big.ref.sha256) == big.data
    assert store.get(small.ref.sha256) == b"small"
    big_path = tmp_path / big.ref.sha256[:2] / big.ref.sha256[2:4]
    assert any(path.startswith(str(big_path / ".tmp-")) for path in fsyncs)
    assert len(syncfs) == 2
