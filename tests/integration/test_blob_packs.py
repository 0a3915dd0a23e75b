"""Blob packs (``switchboard.packs``) on the real file system, with real processes:
what a writer acknowledged is read back by any other process, after a kill, a
torn record, a failed write or sync, a lost index and a collection."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path

import pytest

from normalize.content import Blob
from switchboard import packs as packs_module
from switchboard.blobs import BIG_BLOB, BlobNotFound, FileBlobStore, PackBlobStore, collect_garbage
from switchboard.packs import HEADER, INDEX, MAGIC, PACKS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RETENTION = timedelta(days=30)


def _blobs(tag: str, count: int, size: int = 700) -> list[Blob]:
    return [Blob.of(f"{tag} {i} ".encode() + os.urandom(size), "text/plain") for i in range(count)]


def _packs(root: Path) -> list[Path]:
    return sorted((root / PACKS).glob("*.pack"))


def _read(pack: Path) -> tuple[list[packs_module.Record], int]:
    """The pack's whole records, and where they end."""
    fd = os.open(pack, os.O_RDONLY)
    try:
        return packs_module.read_records(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _age(path: Path, days: float = 40) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def _nothing(_among: Collection[str]) -> set[str]:
    return set()


def test_a_blob_written_by_one_store_is_read_by_another(tmp_path: Path) -> None:
    writer, reader = PackBlobStore(tmp_path), PackBlobStore(tmp_path)
    small, big = _blobs("small", 40), Blob.of(os.urandom(BIG_BLOB), "application/zip")
    try:
        writer.put_many([*small[:20], big])
        writer.put_many(small[20:])
        writer.put(small[0])  # again: a second record, still one blob
        assert all(reader.get(b.ref.sha256) == b.data for b in small)
        assert reader.get(big.ref.sha256) == big.data
        assert reader.exists(small[5].ref.sha256)
        assert not reader.exists("0" * 64)
        assert not reader.exists("not a digest")
        with pytest.raises(BlobNotFound):
            reader.get("f" * 64)
    finally:
        writer.close()
        reader.close()
    [pack] = _packs(tmp_path)  # one writer, one pack; the big blob is a file of its own
    assert (tmp_path / big.ref.sha256[:2] / big.ref.sha256[2:4] / big.ref.sha256).is_file()
    assert pack.stat().st_size == sum(HEADER.size + b.ref.size for b in [*small, small[0]])


def test_a_store_of_the_file_layout_and_a_pack_store_read_each_others_blobs(
    tmp_path: Path,
) -> None:
    files, packed = _blobs("files", 3), _blobs("packed", 3)
    FileBlobStore(tmp_path).put_many(files)
    store = PackBlobStore(tmp_path)
    store.put_many(packed)
    assert all(store.get(b.ref.sha256) == b.data for b in files + packed)
    store.close()


def test_what_a_killed_writer_acknowledged_is_read_back(tmp_path: Path) -> None:
    """A writer process appends groups as fast as it can and prints each group's
    digests once put_many returns; it is killed with SIGKILL in mid-stream."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from normalize.content import Blob
        from switchboard.blobs import PackBlobStore
        store = PackBlobStore(Path({str(tmp_path)!r}), rotate_bytes=200_000)
        n = 0
        while True:
            group = [Blob.of(os.urandom(300 + (n + i) % 5000), "x") for i in range(8)]
            n += 8
            store.put_many(group)
            print(" ".join(b.ref.sha256 for b in group), flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    while len(acknowledged) < 4000:
        line = child.stdout.readline()
        assert line, "the writer died"
        acknowledged.extend(line.split())
    child.kill()
    child.wait()
    acknowledged.extend(child.stdout.read().split())  # printed before the kill
    reader = PackBlobStore(tmp_path)
    try:
        missing = [d for d in acknowledged if not reader.exists(d)]
    finally:
        reader.close()
    assert missing == []
    assert len(_packs(tmp_path)) > 1  # it moved to new packs on the way


def test_a_torn_record_at_a_packs_end_hides_nothing_before_it(tmp_path: Path) -> None:
    writer = PackBlobStore(tmp_path)
    whole = _blobs("whole", 10)
    writer.put_many(whole)
    writer.close()
    [pack] = _packs(tmp_path)
    torn = Blob.of(b"torn " * 100, "text/plain")
    with pack.open("ab") as f:  # a crash in the middle of an append
        f.write(HEADER.pack(MAGIC, bytes.fromhex(torn.ref.sha256), torn.ref.size))
        f.write(torn.data[:100])
    reader = PackBlobStore(tmp_path)
    try:
        assert all(reader.get(b.ref.sha256) == b.data for b in whole)
        assert not reader.exists(torn.ref.sha256)
        # Garbage where a header should be: the records before it still count.
        with pack.open("ab") as f:
            f.write(b"\0" * 200)
        assert all(reader.exists(b.ref.sha256) for b in whole)
        records, end = _read(pack)
        assert [r.sha256 for r in records] == [b.ref.sha256 for b in whole]
        assert end == sum(HEADER.size + b.ref.size for b in whole)
    finally:
        reader.close()


def test_a_failed_append_moves_the_writer_to_a_new_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that stops half-way (a full disk) leaves a torn record: nothing may be
    appended after it, where readers would never look."""
    store = PackBlobStore(tmp_path)
    before, failed, after = _blobs("before", 5), _blobs("failed", 5), _blobs("after", 5)
    store.put_many(before)
    real_writev = os.writev

    def half_then_full(fd: int, buffers: list[memoryview]) -> int:
        real_writev(fd, [buffers[0][: len(buffers[0]) // 2]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_full)
    with pytest.raises(OSError, match="No space"):
        store.put_many(failed)
    monkeypatch.setattr(os, "writev", real_writev)
    store.put_many(after)
    store.close()
    assert len(_packs(tmp_path)) == 2
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for b in before + after)
    assert not any(reader.exists(b.ref.sha256) for b in failed)
    reader.close()


def test_a_failed_sync_is_told_and_the_pack_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("first", 2))

    def eio(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError, match="Input/output"):
        store.put_many(_blobs("unsynced", 2))
    monkeypatch.undo()
    later = _blobs("later", 2)
    store.put_many(later)
    store.close()
    assert len(_packs(tmp_path)) == 2  # after a failed sync, a new pack
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for b in later)
    reader.close()


def test_a_writer_moves_to_a_new_pack_past_its_size(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path, rotate_bytes=10_000)
    blobs = _blobs("rotated", 60, size=900)
    for i in range(0, 60, 3):
        store.put_many(blobs[i : i + 3])
    store.close()
    assert len(_packs(tmp_path)) >= 5
    assert all(p.stat().st_size <= 10_000 for p in _packs(tmp_path))
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for b in blobs)
    reader.close()


def test_many_threads_append_at_once(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    groups = [_blobs(f"thread {t}", 50, size=200) for t in range(8)]

    def write(group: list[Blob]) -> None:
        for i in range(0, len(group), 5):
            store.put_many(group[i : i + 5])

    threads = [threading.Thread(target=write, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for g in groups for b in g)
    reader.close()


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_the_index_is_a_cache_built_again_from_the_packs(tmp_path: Path, damage: str) -> None:
    blobs = _blobs("indexed", 20)
    store = PackBlobStore(tmp_path)
    store.put_many(blobs)
    assert store.get(blobs[0].ref.sha256) == blobs[0].data  # indexed now
    store.close()
    index = tmp_path / PACKS / INDEX
    for path in index.parent.glob(INDEX + "*"):
        path.unlink()
    if damage == "garbage":
        index.write_bytes(b"this is not a database" * 100)
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for b in blobs)
    reader.close()


def test_a_wrong_index_row_is_a_miss_never_wrong_bytes(tmp_path: Path) -> None:
    a, b = _blobs("a", 1)[0], _blobs("b", 1)[0]
    store = PackBlobStore(tmp_path)
    store.put_many([a, b])
    assert store.get(a.ref.sha256) == a.data
    db = store.packs.index._connect()  # the cache itself, made wrong
    db.execute(
        "UPDATE records SET sha256 = ? WHERE sha256 = ?",
        (bytes.fromhex(b.ref.sha256), bytes.fromhex(a.ref.sha256)),
    )
    assert store.get(b.ref.sha256) == b.data
    store.close()


def test_collection_keeps_what_is_referenced_or_young_and_never_a_live_writers_pack(
    tmp_path: Path,
) -> None:
    old = _blobs("old", 6)
    retired = PackBlobStore(tmp_path)
    retired.put_many(old)
    retired.close()  # its writer let go of it
    [old_pack] = _packs(tmp_path)
    _age(old_pack)
    live = PackBlobStore(tmp_path)
    live_blobs = _blobs("live", 3)
    live.put_many(live_blobs)  # a pack a writer still holds
    live_pack = next(p for p in _packs(tmp_path) if p != old_pack)
    _age(live_pack)
    again = old[5]
    live.put_many([again])  # written again for a new message: a young record
    _age(live_pack)
    referenced = {old[0].ref.sha256, old[1].ref.sha256}

    def references(among: Collection[str]) -> set[str]:
        return referenced & set(among)

    collector = PackBlobStore(tmp_path)
    # old[5] is not reported deleted: its young copy stays.
    dry = collect_garbage(collector, [references], RETENTION, dry_run=True)
    assert sorted(d for d, _ in dry.deleted) == sorted(b.ref.sha256 for b in old[2:5])
    assert old_pack.exists()
    report = collect_garbage(collector, [references], RETENTION)
    collector.close()
    assert sorted(d for d, _ in report.deleted) == sorted(b.ref.sha256 for b in old[2:5])
    assert report.referenced == 2
    assert report.young == 4  # the live writer's records, whatever their age
    assert not old_pack.exists()
    assert live_pack.exists()
    reader = PackBlobStore(tmp_path)
    assert reader.get(old[0].ref.sha256) == old[0].data  # copied to a young pack
    assert reader.get(old[1].ref.sha256) == old[1].data
    assert reader.get(again.ref.sha256) == again.data  # its young copy
    assert not any(reader.exists(b.ref.sha256) for b in old[2:5])
    assert all(reader.get(b.ref.sha256) == b.data for b in live_blobs)
    # The copies are young: the next collection keeps them.
    second = collect_garbage(reader, [_nothing], RETENTION)
    assert second.deleted == []
    live.close()
    reader.close()


def test_a_reader_whose_index_points_at_a_collected_pack_finds_the_copy(tmp_path: Path) -> None:
    kept = _blobs("kept", 2)
    writer = PackBlobStore(tmp_path)
    writer.put_many(kept)
    writer.close()
    reader = PackBlobStore(tmp_path)
    assert reader.get(kept[0].ref.sha256) == kept[0].data  # its row: the old pack
    for pack in _packs(tmp_path):
        _age(pack)
    collector = PackBlobStore(tmp_path)
    report = collect_garbage(
        collector, [lambda among: {b.ref.sha256 for b in kept} & set(among)], RETENTION
    )
    assert report.deleted == []
    # A pack all referenced is left as it is; one more record makes it collectable.
    writer = PackBlobStore(tmp_path, rotate_bytes=1)
    extra = _blobs("extra", 1)
    writer.put_many(extra)
    writer.close()
    for pack in _packs(tmp_path):
        _age(pack)
    report = collect_garbage(
        collector, [lambda among: {b.ref.sha256 for b in kept} & set(among)], RETENTION
    )
    collector.close()
    assert [d for d, _ in report.deleted] == [extra[0].ref.sha256]
    assert all(reader.get(b.ref.sha256) == b.data for b in kept)
    reader.close()


def test_a_link_in_the_packs_directory_is_not_read(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("real", 1))
    planted = Blob.of(b"planted elsewhere", "text/plain")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.pack"
    outside.write_bytes(
        HEADER.pack(MAGIC, bytes.fromhex(planted.ref.sha256), planted.ref.size) + planted.data
    )
    (tmp_path / PACKS / "0000000000000-1-planted-0.pack").symlink_to(outside)
    assert not store.exists(planted.ref.sha256)
    report = collect_garbage(store, [_nothing], RETENTION)
    assert report.deleted == []
    assert outside.exists()
    store.close()


def test_a_write_of_more_blobs_than_one_writev_takes(tmp_path: Path) -> None:
    """A mail may carry a thousand attachments: 2,000 buffers, over Linux's 1,024."""
    store = PackBlobStore(tmp_path)
    many = _blobs("many", 1500, size=20)
    store.put_many(many)
    store.close()
    reader = PackBlobStore(tmp_path)
    assert all(reader.get(b.ref.sha256) == b.data for b in many)
    reader.close()


def test_every_acknowledged_append_was_covered_by_a_finished_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight threads append at once; each put_many may return only after an fdatasync
    that started once its bytes were written has finished."""
    real = os.fdatasync
    covered = [0]
    guard = threading.Lock()

    def recording(fd: int) -> None:
        size = os.fstat(fd).st_size  # what this sync covers
        time.sleep(0.002)  # a disk: others append meanwhile
        real(fd)
        with guard:
            covered[0] = max(covered[0], size)

    monkeypatch.setattr(os, "fdatasync", recording)
    store = PackBlobStore(tmp_path)
    seen: dict[str, int] = {}  # digest -> what was covered when its put_many returned

    def write(t: int) -> None:
        for g in range(20):
            group = _blobs(f"t{t} g{g}", 3, size=100)
            store.put_many(group)
            with guard:
                for blob in group:
                    seen[blob.ref.sha256] = covered[0]

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    [pack] = _packs(tmp_path)
    records, _end = _read(pack)
    assert len(records) == 8 * 20 * 3
    late = [r.sha256 for r in records if seen[r.sha256] < r.offset + HEADER.size + r.size]
    assert late == []


def test_a_failed_sync_fails_every_append_it_did_not_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's sync fails after C appended behind A's record: the kernel may tell C's own
    sync 0 (it reports a write-back error once per open file), so C must hear the
    failure from the pack itself; after a crash, readers would stop at A's record."""
    real = os.fdatasync
    c_appended = threading.Event()

    def failing_for_a(fd: int) -> None:
        if threading.current_thread().name == "A":
            c_appended.wait(5)
            time.sleep(0.1)  # C is waiting for the pack's sync now
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_for_a)
    store = PackBlobStore(tmp_path)
    results: dict[str, str] = {}

    def put(name: str, blob: Blob) -> None:
        try:
            store.put_many([blob])
            results[name] = "stored"
        except OSError as exc:
            results[name] = f"failed: {exc}"

    real_writev = os.writev

    def noting_c(fd: int, buffers: list[memoryview]) -> int:
        written = real_writev(fd, buffers)
        if threading.current_thread().name == "C":
            c_appended.set()
        return written

    monkeypatch.setattr(os, "writev", noting_c)
    a = threading.Thread(target=put, args=("A", _blobs("A", 1)[0]), name="A")
    c = threading.Thread(target=put, args=("C", _blobs("C", 1)[0]), name="C")
    a.start()
    time.sleep(0.05)
    c.start()
    a.join()
    c.join()
    assert results["A"].startswith("failed"), results
    assert results["C"].startswith("failed"), results
    monkeypatch.undo()
    later = _blobs("later", 1)
    store.put_many(later)  # a new pack
    store.close()
    assert len(_packs(tmp_path)) == 2


def test_damaged_bytes_are_never_returned(tmp_path: Path) -> None:
    blob = _blobs("damaged", 1)[0]
    store = PackBlobStore(tmp_path)
    store.put_many([blob])
    store.close()
    [pack] = _packs(tmp_path)
    with pack.open("r+b") as f:  # one bit flipped in the blob's bytes
        f.seek(HEADER.size + 10)
        byte = f.read(1)
        f.seek(HEADER.size + 10)
        f.write(bytes([byte[0] ^ 1]))
    reader = PackBlobStore(tmp_path)
    with pytest.raises(BlobNotFound):
        reader.get(blob.ref.sha256)
    reader.put_many([blob])  # stored again: the sound copy is read
    assert reader.get(blob.ref.sha256) == blob.data
    reader.close()


def test_a_writer_moves_to_a_new_pack_after_its_age(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path, rotate_age_s=0.2)
    store.put_many(_blobs("first", 1))
    store.put_many(_blobs("soon after", 1))
    assert len(_packs(tmp_path)) == 1
    time.sleep(0.3)
    store.put_many(_blobs("later", 1))
    store.close()
    assert len(_packs(tmp_path)) == 2


def test_collection_deletes_old_packs_without_a_whole_record(tmp_path: Path) -> None:
    directory = tmp_path / PACKS
    directory.mkdir(parents=True)
    empty = directory / "0000000000001-1-dead-0.pack"
    empty.write_bytes(b"")  # a failed first write
    torn = directory / "0000000000002-1-dead-0.pack"
    blob = _blobs("torn", 1)[0]
    torn.write_bytes(HEADER.pack(MAGIC, bytes.fromhex(blob.ref.sha256), blob.ref.size) + b"x")
    for path in (empty, torn):
        _age(path)
    store = PackBlobStore(tmp_path)
    report = collect_garbage(store, [_nothing], RETENTION)
    store.close()
    assert report.deleted == []
    assert _packs(tmp_path) == []


def test_collection_salvages_the_records_after_a_damaged_stretch(tmp_path: Path) -> None:
    first, middle, last = _blobs("first", 1)[0], _blobs("middle", 1)[0], _blobs("last", 1)[0]
    store = PackBlobStore(tmp_path)
    store.put_many([first, middle, last])
    store.close()
    [pack] = _packs(tmp_path)
    with pack.open("r+b") as f:  # a bad block over the middle record's header
        f.seek(HEADER.size + first.ref.size)
        f.write(b"\0" * 20)
    _age(pack)
    keep = {first.ref.sha256, middle.ref.sha256, last.ref.sha256}
    collector = PackBlobStore(tmp_path)
    collect_garbage(collector, [lambda among: keep & set(among)], RETENTION)
    collector.close()
    assert pack not in _packs(tmp_path)
    reader = PackBlobStore(tmp_path)
    assert reader.get(first.ref.sha256) == first.data
    assert reader.get(last.ref.sha256) == last.data  # found past the damage, and kept
    assert not reader.exists(middle.ref.sha256)
    reader.close()


def test_collection_asks_each_table_once(tmp_path: Path) -> None:
    for i in range(5):
        store = PackBlobStore(tmp_path)
        store.put_many(_blobs(f"pack {i}", 2))
        store.close()
    for pack in _packs(tmp_path):
        _age(pack)
    asked: list[int] = []

    def references(among: Collection[str]) -> set[str]:
        asked.append(len(among))
        return set()

    collector = PackBlobStore(tmp_path)
    report = collect_garbage(collector, [references], RETENTION)
    collector.close()
    assert asked == [10]
    assert len(report.deleted) == 10


def test_a_busy_index_does_not_stop_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_module, "BUSY_TIMEOUT_S", 0.2)
    blob = _blobs("busy", 1)[0]
    writer = PackBlobStore(tmp_path)
    writer.put_many([blob])
    writer.close()
    indexer = PackBlobStore(tmp_path)
    indexer.packs.index.catch_up()  # the index exists
    holder = sqlite3.connect(tmp_path / PACKS / INDEX, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long transaction
    try:
        reader = PackBlobStore(tmp_path)
        assert reader.get(blob.ref.sha256) == blob.data  # from the pack itself
        reader.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        indexer.close()


def test_a_damaged_index_is_set_aside_and_built_again(tmp_path: Path) -> None:
    blobs = _blobs("indexed", 2000, size=10)
    store = PackBlobStore(tmp_path)
    store.put_many(blobs)
    assert store.get(blobs[0].ref.sha256) == blobs[0].data  # indexed
    store.close()
    index = tmp_path / PACKS / INDEX
    db = sqlite3.connect(index)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size, pages = (
        db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count")
    )
    db.close()
    with index.open("r+b") as f:  # every page but the first few: the records' b-trees
        f.seek(4 * page_size)
        f.write(os.urandom((pages - 4) * page_size))
    reader = PackBlobStore(tmp_path)
    assert reader.get(blobs[7].ref.sha256) == blobs[7].data  # the packs, read
    assert reader.get(blobs[8].ref.sha256) == blobs[8].data  # the index, built again
    reader.close()
    db = sqlite3.connect(index)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 2000
    db.close()


def test_a_fifo_in_the_packs_directory_does_not_hang_a_collection(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("real", 1))
    store.close()
    os.mkfifo(tmp_path / PACKS / "0000000000000-1-fifo-0.pack")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from datetime import timedelta
        from pathlib import Path
        from switchboard.blobs import PackBlobStore, collect_garbage
        store = PackBlobStore(Path({str(tmp_path)!r}))
        collect_garbage(store, [lambda among: set()], timedelta(days=30))
        print(store.exists("0" * 64), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.stdout.strip() == "False", done.stderr


def test_a_closed_store_refuses_writes_and_a_bad_digest_is_not_found(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("before", 1))
    store.close()
    with pytest.raises(OSError, match="closed"):
        store.put_many(_blobs("after", 1))
    with pytest.raises(BlobNotFound):
        store.get("not-a-digest")
    with pytest.raises(BlobNotFound):
        store.get("ab" * 31)  # hex, but not 64 digits


def test_garbage_where_a_header_should_be_ends_the_records(tmp_path: Path) -> None:
    whole = _blobs("whole", 3)
    store = PackBlobStore(tmp_path)
    store.put_many(whole)
    store.close()
    [pack] = _packs(tmp_path)
    with pack.open("ab") as f:
        f.write(b"\0" * 200)  # zeros: a record of size 0 if the magic were not checked
    records, end = _read(pack)
    assert [r.sha256 for r in records] == [b.ref.sha256 for b in whole]
    assert end == sum(HEADER.size + b.ref.size for b in whole)


def test_a_flipped_bit_in_a_size_loses_no_referenced_blob(tmp_path: Path) -> None:
    """An unreferenced record's size grows by a bit flip and swallows the records
    behind it; the collector still finds them by their digests, keeps the referenced
    one, and sets the damaged pack aside instead of deleting it."""
    a, b, c = _blobs("a", 1)[0], _blobs("b", 1)[0], _blobs("c", 1)[0]
    store = PackBlobStore(tmp_path)
    store.put_many([a, b, c])
    store.close()
    [pack] = _packs(tmp_path)
    with pack.open("r+b") as f:  # a's size: + 2 KiB, still inside the pack
        f.write(HEADER.pack(MAGIC, bytes.fromhex(a.ref.sha256), a.ref.size + 2048))
    _age(pack)
    keep = {b.ref.sha256, c.ref.sha256}
    collector = PackBlobStore(tmp_path)
    report = collect_garbage(collector, [lambda among: keep & set(among)], RETENTION)
    collector.close()
    assert report.deleted == []  # a could not be read: not deleted, not counted
    assert not pack.exists()
    assert (tmp_path / PACKS / f".damaged-{pack.name}").exists()
    reader = PackBlobStore(tmp_path)
    assert reader.get(b.ref.sha256) == b.data
    assert reader.get(c.ref.sha256) == c.data
    reader.close()


def test_a_pack_that_cannot_be_read_stops_neither_collection_nor_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tag in ("bad", "good 1", "good 2"):
        store = PackBlobStore(tmp_path)
        store.put_many(_blobs(tag, 2))
        store.close()
    bad = _packs(tmp_path)[0]
    real = os.pread

    def bad_block(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == str(bad):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", bad_block)
    reader = PackBlobStore(tmp_path)
    probe = _blobs("late", 1)[0]
    writer = PackBlobStore(tmp_path)
    writer.put_many([probe])
    assert reader.get(probe.ref.sha256) == probe.data  # indexing skipped the bad pack
    writer.close()
    for pack in _packs(tmp_path):
        _age(pack)
    report = collect_garbage(reader, [_nothing], RETENTION)
    reader.close()
    assert _packs(tmp_path) == [bad]  # the others collected, the bad one left
    assert len(report.deleted) == 5


def test_a_wrong_index_row_still_finds_the_blob(tmp_path: Path) -> None:
    blob = _blobs("row", 1)[0]
    store = PackBlobStore(tmp_path)
    store.put_many([blob])
    assert store.get(blob.ref.sha256) == blob.data
    db = store.packs.index._connect()
    for size, offset in ((2**45, 0), (-1, 0), (blob.ref.size, -5)):
        db.execute("UPDATE records SET size = ?, offset = ?", (size, offset))
        assert store.get(blob.ref.sha256) == blob.data  # the pack, read
    store.close()


def test_a_new_pack_is_locked_before_anyone_can_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    visible_at_lock: list[list[str]] = []
    real = fcntl.flock

    def watching(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH:
            visible_at_lock.append(
                sorted(name for name, _ in packs_module._pack_files(tmp_path / PACKS))
            )
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", watching)
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("new", 1))
    store.close()
    assert visible_at_lock == [[]]
    assert len(_packs(tmp_path)) == 1


def test_a_closed_store_refuses_big_blobs_too(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    store.close()
    big = Blob.of(os.urandom(BIG_BLOB), "application/zip")
    with pytest.raises(OSError, match="closed"):
        store.put(big)
    with pytest.raises(OSError, match="closed"):
        store.put_many([big])
    assert not (tmp_path / big.ref.sha256[:2]).exists()


def test_a_dead_writers_unplaced_pack_is_removed_after_an_hour(tmp_path: Path) -> None:
    store = PackBlobStore(tmp_path)
    store.put_many(_blobs("real", 1))
    store.close()
    stale = tmp_path / PACKS / ".0000000000000-1-dead-0.pack.new"
    fresh = tmp_path / PACKS / ".0000000000001-1-alive-0.pack.new"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    then = time.time() - 2 * 3600
    os.utime(stale, (then, then))
    collector = PackBlobStore(tmp_path)
    collect_garbage(collector, [_nothing], RETENTION)
    collector.close()
    assert not stale.exists()
    assert fresh.exists()
