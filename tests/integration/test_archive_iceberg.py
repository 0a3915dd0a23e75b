"""The archive's Iceberg table follows its files: new files are registered where they
are, a replaced range leaves the table with its replacement, a second keeper of the
same catalog sees the same table; pyiceberg's SQL catalog on SQLite and PostgreSQL; an archive on an
S3-protocol server. Another URL scheme is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sinks.archive import ArchiveHandler
from sinks.archive_files import LocalArchive
from sinks.archive_iceberg import IcebergTable, IcebergUnavailable
from sinks.archive_rows import SCHEMA
from sinks.settings import ArchiveSettings
from switchboard.db import normalize_url
from tests.s3_helpers import CREDENTIALS, s3_server


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return normalize_url(request.getfixturevalue("postgres_schema_url"))


def _part(root: Path, topic: str, first: int, n: int) -> Path:
    directory = root / f"topic={topic}" / "date=2026-11-29"
    directory.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[object]] = {name: [None] * n for name in SCHEMA.names}
    rows["topic"] = [topic] * n
    rows["partition"] = [0] * n
    rows["offset"] = list(range(first, first + n))
    rows["id"] = [f"{topic}-{o}" for o in range(first, first + n)]
    path = directory / f"part-0-{first}-{first + n - 1}.parquet"
    pq.write_table(pa.Table.from_pydict(rows, schema=SCHEMA), path)
    return path


def _offsets(table: IcebergTable) -> list[tuple[str, int]]:
    rows = table.table.scan(selected_fields=("topic", "offset")).to_arrow().to_pylist()
    return sorted((r["topic"], r["offset"]) for r in rows)


def test_the_table_follows_the_files(tmp_path: Path, catalog_url: str) -> None:
    root = tmp_path / "archive"
    first = _part(root, "switchboard.routed.v1", 0, 3)
    _part(root, "switchboard.inbound.v1", 0, 2)
    (
        root / "topic=switchboard.routed.v1" / "date=2026-11-29" / ".part-0-3-9.parquet.tmp"
    ).write_bytes(b"half written")
    table = IcebergTable(str(root), catalog_url)
    assert table.sync() == (2, 0)
    assert len(_offsets(table)) == 5
    assert table.sync() == (0, 0)
    # A second writer of the range replaced the file with a longer one.
    first.unlink()
    _part(root, "switchboard.routed.v1", 0, 6)
    assert table.sync() == (1, 1)
    assert _offsets(table) == sorted(
        [("switchboard.routed.v1", o) for o in range(6)]
        + [("switchboard.inbound.v1", o) for o in range(2)]
    )
    # The catalog is the database's: another process opening it sees the same table.
    again = IcebergTable(str(root), catalog_url)
    assert again.sync() == (0, 0)
    assert len(_offsets(again)) == 8


def test_the_table_follows_the_files_set_aside_at_a_new_embedded_log(
    tmp_path: Path, catalog_url: str
) -> None:
    """At each start of `switchboard run` (a new, empty embedded broker) the files of
    the old logs are renamed `before-<time>-part-*`; the table still named them by
    their old names, and a scan failed with FileNotFoundError until the next file
    was written (review, 2026-12-01)."""
    root = tmp_path / "archive"
    _part(root, "switchboard.routed.v1", 0, 3)
    _part(root, "switchboard.inbound.v1", 0, 2)
    table = IcebergTable(str(root), catalog_url)
    assert table.sync() == (2, 0)
    handler = ArchiveHandler(
        LocalArchive(root), ArchiveSettings(), IcebergTable(str(root), catalog_url)
    )
    handler.embedded_partitions = 1
    handler.prepare()  # a start on a new embedded broker
    assert not list(root.glob("topic=*/date=*/part-*.parquet"))
    assert len(list(root.glob("topic=*/date=*/before-*-part-*.parquet"))) == 2
    reread = IcebergTable(str(root), catalog_url)
    assert len(_offsets(reread)) == 5  # the same rows, under their new names


@pytest.mark.slow
def test_on_s3_the_table_registers_the_objects_in_place(tmp_path: Path, unique: str) -> None:
    """On an S3-protocol server (moto's server mode): the archive's storage options
    become the catalog's S3 settings; pyiceberg reads the footers from S3 to register
    the files and reads the rows back from there."""
    with s3_server() as server:
        fs = server.filesystem()
        bucket = f"archive-{unique}"
        fs.mkdir(bucket)
        local = tmp_path / "staged"
        first = _part(local, "switchboard.routed.v1", 0, 3)
        second = _part(local, "switchboard.inbound.v1", 0, 2)
        root = f"s3://{bucket}/events"
        for path in (first, second):
            fs.put_file(str(path), f"{root}/{path.relative_to(local)}".removeprefix("s3://"))
        fs.pipe_file(f"{bucket}/events/topic=x/date=2026-11-29/.part-0-0-1.parquet.tmp", b"x")
        catalog = f"sqlite:///{tmp_path / 'catalog.db'}"
        with pytest.MonkeyPatch.context() as env:
            for name, value in CREDENTIALS.items():
                env.setenv(name, value)
            table = IcebergTable(root, catalog, server.options())
            assert table.sync() == (2, 0)
            assert len(_offsets(table)) == 5
            fs.rm_file(f"{root}/{first.relative_to(local)}".removeprefix("s3://"))
            assert table.sync() == (0, 1)
            assert _offsets(table) == [("switchboard.inbound.v1", 0), ("switchboard.inbound.v1", 1)]


def test_another_url_root_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(IcebergUnavailable, match="local or s3:// root"):
        IcebergTable("gs://bucket/archive", f"sqlite:///{tmp_path / 'c.db'}")
