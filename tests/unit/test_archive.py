"""The archive sink's handler on a local directory, with records built in memory."""

from __future__ import annotations

import logging
import uuid
from collections import namedtuple
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka.structs import TopicPartition

from normalize.schema import ContactEvent, ContactEventKind
from sinks.archive import ArchiveHandler
from sinks.archive_buffer import BufferLog, decode, encode
from sinks.archive_files import LocalArchive, Part
from sinks.archive_rows import to_row
from switchboard.events import TYPE_INBOUND, Event, contact_event_type
from switchboard.settings import ArchiveSettings
from switchboard.topics import CONTACTS, INBOUND
from tests.archive_helpers import query
from tests.factories import inbound_message

Record = namedtuple("Record", "topic partition offset key value headers timestamp")

OTHER = uuid.uuid4()
DAY1 = int(datetime(2026, 11, 27, 23, 59, tzinfo=UTC).timestamp() * 1000)
DAY2 = int(datetime(2026, 11, 28, 0, 1, tzinfo=UTC).timestamp() * 1000)


def _inbound(offset: int, partition: int = 0, stamp: int = DAY2) -> Record:
    message = inbound_message()
    event = Event(type=TYPE_INBOUND, source="test", key="email:a@example.com", data=message)
    return Record(INBOUND, partition, offset, b"k", event.value(), event.headers(), stamp)


def _handler(root: Path, **settings: Any) -> ArchiveHandler:  # noqa: ANN401
    return ArchiveHandler(LocalArchive(root), ArchiveSettings(**settings))


def _offsets(root: Path) -> list[tuple[str, int, int]]:
    rows = query(root, 'SELECT topic, partition, "offset" FROM events ORDER BY 1, 2, 3')
    return [(str(t), int(p), int(o)) for t, p, o in rows]


def test_typed_columns_of_an_inbound_and_a_contact_event() -> None:
    row = to_row(_inbound(7))
    assert row["type"] == TYPE_INBOUND
    assert row["channel"] == "email"
    assert row["sender_kind"] == "email"
    assert row["received_at"] is not None
    assert "archive_error" not in row
    contact = ContactEvent(
        event_id=uuid.uuid4(),
        kind=ContactEventKind.MERGED,
        contact_id=uuid.uuid4(),
        other_contact_id=OTHER,
        occurred_at=datetime.now(UTC),
        by="alice",
    )
    event = Event(type=contact_event_type("contact.merged"), source="t", key="c", data=contact)
    row = to_row(Record(CONTACTS, 1, 3, b"c", event.value(), event.headers(), DAY2))
    assert (row["kind"], row["by"], row["other_contact_id"]) == (
        "contact.merged",
        "alice",
        str(OTHER),
    )


def test_a_bad_record_still_gets_a_row_saying_why() -> None:
    good = _inbound(0)
    cases = {
        "encoding": good._replace(value=b"\xff\xfe"),
        "json": good._replace(value=b"{not json"),
        "envelope-headers": good._replace(headers=[]),
        "type": good._replace(
            headers=[(k, b"io.example.other.v1" if k == "ce_type" else v) for k, v in good.headers]
        ),
        "empty": good._replace(value=None),
    }
    for reason, record in cases.items():
        row = to_row(record)
        assert reason in [e.split(":")[0] for e in row["archive_error"].split("; ")]
        assert row["offset"] == 0
    assert to_row(cases["encoding"])["raw"] == b"\xff\xfe"


def test_files_roll_by_size_and_day_and_commits_wait_for_them(tmp_path: Path) -> None:
    handler = _handler(tmp_path, roll_bytes=4000, roll_s=3600)
    tp = TopicPartition(INBOUND, 0)
    handler.handle([_inbound(0, stamp=DAY1), _inbound(1)])  # midnight: day 1's file rolls
    assert (tmp_path / f"topic={INBOUND}/date=2026-11-27/part-0-0-0.parquet").is_file()
    assert handler.committable({tp: 2}) == {tp: 1}  # offset 1 is only buffered
    handler.handle([_inbound(o) for o in range(2, 6)])
    names = sorted(p.name for p in (tmp_path / f"topic={INBOUND}/date=2026-11-28").iterdir())
    assert names
    assert all(n.startswith("part-0-") for n in names)
    assert not any(n.startswith(".") for n in names)  # no temporary file left behind
    written = _offsets(tmp_path)
    held = handler.committable({tp: 6})[tp]
    assert [o for _, _, o in written] == list(range(held))


def test_after_a_crash_each_offset_lands_once(tmp_path: Path) -> None:
    first = _handler(tmp_path, roll_bytes=1, roll_s=3600)  # a file per record
    first.handle([_inbound(o) for o in range(3)])
    # The process died before committing: a new one reads everything again, plus more.
    second = _handler(tmp_path, roll_bytes=1, roll_s=3600)
    second.handle([_inbound(o) for o in range(6)])
    assert second.skipped == 3
    assert [o for _, _, o in _offsets(tmp_path)] == list(range(6))


def test_a_replayed_batch_replaces_what_was_buffered(tmp_path: Path) -> None:
    buffered = _handler(tmp_path, roll_bytes=10**9, roll_s=3600)
    buffered.handle([_inbound(o, partition=2) for o in range(4)])
    buffered.handle([_inbound(o, partition=2) for o in range(2, 5)])  # a rewind to 2
    buffered.settings = ArchiveSettings(roll_bytes=10**9, roll_s=0.000001)
    buffered.idle()
    assert [o for _, _, o in _offsets(tmp_path)] == list(range(5))


def test_a_range_written_again_replaces_the_files_it_covers(tmp_path: Path) -> None:
    archive = LocalArchive(tmp_path)
    stale = Part(INBOUND, "2026-11-28", 0, 3, 4)
    archive.write(stale, b"stale")
    handler = ArchiveHandler(archive, ArchiveSettings(roll_bytes=10**9, roll_s=0.000001))
    handler._next[TopicPartition(INBOUND, 0)] = 0  # a second writer that did not see it
    handler.handle([_inbound(o) for o in range(2, 6)])
    handler_files = {p.name for p in archive.parts(INBOUND, 0)}
    assert stale.name not in handler_files
    assert [o for _, _, o in _offsets(tmp_path)] == list(range(2, 6))


class _Log:
    """Stands in for the consumer the sink asks for a partition log's end."""

    def __init__(self, end: int) -> None:
        self.end = end

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, self.end)


def test_a_new_broker_numbering_from_zero_again_skips_nothing(tmp_path: Path) -> None:
    before = _handler(tmp_path, roll_bytes=1, roll_s=3600)
    before.handle([_inbound(o) for o in range(6)])
    # The embedded broker restarted: its log holds 3 records, offsets 0-2, all new.
    after = _handler(tmp_path, roll_bytes=1, roll_s=3600)
    after.consumer = _Log(end=3)
    after.handle([_inbound(o) for o in range(3)])
    assert after.skipped == 0
    assert [o for _, _, o in _offsets(tmp_path)] == [0, 0, 1, 1, 2, 2, 3, 4, 5]
    kept = sorted(p.name for p in tmp_path.glob("topic=*/date=*/before-*-part-*.parquet"))
    assert len(kept) == 6
    # The same log seen again (a plain restart): nothing is written twice.
    again = _handler(tmp_path, roll_bytes=1, roll_s=3600)
    again.consumer = _Log(end=3)
    again.handle([_inbound(o) for o in range(3)])
    assert again.skipped == 3


def test_what_the_standard_library_reads_as_json_is_json_to_the_archive() -> None:
    # orjson (the fast path) refuses integers past 64 bits and NaN; the standard
    # library accepts both, and so does the archive: no archive_error for them.
    good = _inbound(0)
    for value in (b'{"id": 123456789012345678901234567890}', b'{"score": NaN}'):
        row = to_row(good._replace(value=value))
        assert "archive_error" not in row, row
        assert row["data"] == value.decode()
    row = to_row(good._replace(value=b"[1, 2]"))
    assert row["archive_error"] == "json: the value is not a JSON object"


class _DownCatalog:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def sync(self) -> tuple[int, int]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("catalog database away")
        return (1, 0)


def test_a_failing_iceberg_catalog_is_retried_with_pauses_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = _DownCatalog(failures=4)
    handler = ArchiveHandler(LocalArchive(tmp_path), ArchiveSettings(), catalog)  # type: ignore[arg-type]
    handler.files = 1  # a file written since the last sync
    clock = [1000.0]
    monkeypatch.setattr("sinks.archive.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="sinks.archive"):
        for _ in range(40):  # an idle poll every 1.5 s for a minute
            handler.sync_iceberg()
            clock[0] += 1.5
    # Tries after pauses of 2, 4, 8 and 16 s, then the fifth succeeds: not 40 tries.
    assert catalog.calls == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert any(r.getMessage() == "iceberg table synced again" for r in caplog.records)
    handler.sync_iceberg()
    assert catalog.calls == 5  # nothing new to register


def _buffered(root: Path, buffer: BufferLog) -> ArchiveHandler:
    """A handler on the embedded broker, its buffer on disk, started as a run starts
    it (``prepare``: what an earlier run left is written, the old files set aside)."""
    handler = _handler(root)
    handler.embedded_partitions = 3
    handler.buffer_log = buffer
    handler.prepare()
    return handler


def _handler_rows(handler: ArchiveHandler) -> int:
    """Rows a handler wrote to files (at its start: what it recovered)."""
    return handler.rows


def test_rows_buffered_at_a_crash_are_written_by_the_next_start(tmp_path: Path) -> None:
    """A handler that never wrote its buffer (the process was killed) leaves its rows on
    disk; the next one writes them as files of the old log, the rows the first would
    have written, and empties the buffer."""
    root, path = tmp_path / "archive", tmp_path / "buffer.sqlite3"
    records = [_inbound(n) for n in range(3)] + [_inbound(0, partition=1)]
    crashed = BufferLog(path)
    _buffered(root, crashed).handle(records)
    assert crashed.depth() == 4
    assert not list(root.rglob("*.parquet"))
    restarted = BufferLog(path)  # the same file: a new generation
    assert _handler_rows(_buffered(root, restarted)) == 4
    assert restarted.depth() == 0
    files = sorted(f.name for f in root.rglob("*.parquet"))
    assert len(files) == 2, files
    assert all(name.startswith("before-") for name in files), files
    rows = query(root, 'SELECT id, data, "offset" FROM events ORDER BY partition, "offset"')
    expected = [to_row(r) for r in records]
    assert [tuple(r) for r in rows] == [(e["id"], e["data"], e["offset"]) for e in expected]
    assert _buffered(root, restarted).recover_buffered() == 0  # nothing twice


def test_rows_a_file_already_holds_are_not_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between a file's rename and the buffer's trim: the rows are in both. The
    start skips what the file holds and writes only the rest."""
    root, path = tmp_path / "archive", tmp_path / "buffer.sqlite3"
    buffer = BufferLog(path)
    crashed = _buffered(root, buffer)
    crashed.handle([_inbound(n) for n in range(3)])
    monkeypatch.setattr(buffer, "written", lambda *_: None)  # the trim never ran
    crashed._flush(TopicPartition(INBOUND, 0))  # the file of offsets 0-2
    assert buffer.depth() == 3
    crashed.handle([_inbound(3)])
    _buffered(root, BufferLog(path))
    assert _offsets(root) == [(INBOUND, 0, n) for n in range(4)]


def test_a_broker_restart_under_the_sink_keeps_both_logs_apart(tmp_path: Path) -> None:
    """The embedded broker died under `switchboard run`: its new log numbers from 0
    again. Rows of the old log that a crash then left unwritten, and rows of the new
    one, share offsets; both are written at the next start, neither over the other."""
    root, path = tmp_path / "archive", tmp_path / "buffer.sqlite3"
    buffer = BufferLog(path)
    crashed = _buffered(root, buffer)
    old = [_inbound(n) for n in range(2)]
    crashed.handle(old)
    failed = _inbound(5)
    buffer.add([failed])  # a row of the old log whose file failed
    crashed.rewound()  # writes offsets 0-1 of the old log, sets its files aside
    new = [_inbound(n) for n in range(2)]
    crashed.handle(new)
    assert _handler_rows(_buffered(root, BufferLog(path))) == 3  # new 0-1, old 5
    ids = sorted(str(i) for (i,) in query(root, "SELECT id FROM events"))
    assert ids == sorted(str(to_row(r)["id"]) for r in [*old, failed, *new])


def test_the_buffer_keeps_a_record_exactly_as_read() -> None:
    """No key, no value, a header without a value, empty bytes, a NUL: as they came."""
    records = [
        _inbound(0),
        Record(INBOUND, 2, 7, None, None, [("ce_id", None), ("x\x00", b"")], None),
        Record(INBOUND, 2, 8, b"", b"\x00\xff", [], 0),
    ]
    decoded = decode(INBOUND, 2, encode(records))
    assert [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in decoded] == [
        (r.offset, r.key, r.value, list(r.headers), r.timestamp) for r in records
    ]


def test_a_batch_delivered_again_is_kept_once(tmp_path: Path) -> None:
    """A sink that cannot write retries its batch every few seconds, for hours: the
    buffer keeps each record once (and again only for a new log)."""
    buffer = BufferLog(tmp_path / "buffer.sqlite3")
    batch = [_inbound(n) for n in range(3)]
    for _ in range(5):
        buffer.add(batch)
    buffer.add([*batch, _inbound(3)])
    assert buffer.depth() == 4
    buffer.next_generation()  # a new broker: offsets from 0 again, other records
    buffer.add(batch[:1])
    assert buffer.depth() == 5


def test_a_log_kept_through_a_run_that_could_not_write_is_written_whole_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1 crashes with offsets 0-4 buffered. Run 2 starts while the archive cannot
    write (its recovery keeps them), then writes its own offsets 0-9 and stops. Run
    3 must write run 1's five rows: before (review of 2026-12-01) they were compared
    with run 2's files, skipped, and counted as recovered."""
    root, path = tmp_path / "archive", tmp_path / "buffer.sqlite3"
    first = [_inbound(n) for n in range(5)]
    _buffered(root, BufferLog(path)).handle(first)  # then killed
    failing = _handler(root)
    failing.embedded_partitions = 3
    failing.buffer_log = BufferLog(path)
    write = failing.archive.write

    def unwritable(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(failing.archive, "write", unwritable)
    failing.prepare()
    assert failing.rows == 0
    monkeypatch.setattr(failing.archive, "write", write)
    second = [_inbound(n) for n in range(10)]
    failing.handle(second)
    failing.stopping()  # a clean stop: run 2's files
    third = _buffered(root, BufferLog(path))
    assert third.rows == 5
    ids = sorted(str(i) for (i,) in query(root, "SELECT id FROM events"))
    assert ids == sorted(str(to_row(r)["id"]) for r in [*first, *second])


def test_a_crash_after_recovered_rows_are_written_does_not_write_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed as the recovery forgets a log whose rows it wrote: the files are still
    the current ones (the log is forgotten before they are set aside), so the next
    start skips the rows they hold. Before (review of 2026-12-01) the files were set
    aside first, and the next start wrote every row again."""
    root, path = tmp_path / "archive", tmp_path / "buffer.sqlite3"
    _buffered(root, BufferLog(path)).handle([_inbound(n) for n in range(3)])  # killed
    recovering = _handler(root)
    recovering.embedded_partitions = 3
    recovering.buffer_log = BufferLog(path)

    def killed(*_: object) -> None:
        raise RuntimeError("SIGKILL")

    monkeypatch.setattr(recovering.buffer_log, "forget", killed)
    with pytest.raises(RuntimeError):
        recovering.recover_buffered()
    monkeypatch.undo()
    _buffered(root, BufferLog(path))
    doubled = query(root, "SELECT id, count(*) FROM events GROUP BY id HAVING count(*) > 1")
    assert doubled == []
    assert len(query(root, "SELECT id FROM events")) == 3
