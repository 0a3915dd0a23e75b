"""The archive as an Apache Iceberg table, for Trino, Spark, Snowflake or DuckDB.

The Parquet files stay the source of truth (DuckDB reads them alone); the table
``switchboard.events`` is a catalog over them, kept in step by :meth:`IcebergTable.sync`:
files the archive has and the table lacks are added (``add_files``: registered where
they are, not copied), files the table has and the archive no longer has (a range a
second writer replaced) are removed, in one Iceberg commit. The sink syncs when it
is idle after writing files and when it starts, so a crash between a file's rename and
its registration only delays the registration.

The catalog is pyiceberg's SQL catalog in the project's database (its own
``iceberg_*`` tables), the table's metadata under ``<root>/_iceberg``. The root is a
local directory or an ``s3://`` URL (the archive's ``storage_options`` become the
catalog's S3 settings: endpoint, key, secret, region); other URL schemes are refused
with a clear error.

pyiceberg is an optional dependency (``switchboard-inbound[iceberg]``): the Iceberg project's
own Python library, the one the issue names, rather than hand-written metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sinks.archive_rows import SCHEMA

log = logging.getLogger(__name__)

NAMESPACE = "switchboard"
TABLE = f"{NAMESPACE}.events"


class IcebergUnavailable(RuntimeError):
    """The table cannot be kept: pyiceberg is missing or the root is not local."""


# The archive's fsspec options as pyiceberg's S3 properties.
_S3_PROPERTIES = {
    "endpoint_url": "s3.endpoint",
    "key": "s3.access-key-id",
    "secret": "s3.secret-access-key",
    "region_name": "s3.region",
}


class IcebergTable:
    """``switchboard.events`` over the archive's files; see the module doc."""

    def __init__(
        self, root: str, catalog_url: str, storage_options: dict[str, Any] | None = None
    ) -> None:
        options = dict(storage_options or {})
        properties: dict[str, str] = {}
        if root.startswith("s3://"):
            import fsspec  # noqa: PLC0415 - only for URL roots

            self.fs: Any = fsspec.filesystem("s3", **options)
            self.root = root.rstrip("/")
            warehouse = f"{self.root}/_iceberg"
            properties = {
                _S3_PROPERTIES[k]: str(v) for k, v in options.items() if k in _S3_PROPERTIES
            }
            client = options.get("client_kwargs", {})
            if "region_name" in client:
                properties["s3.region"] = str(client["region_name"])
        elif "://" in root and not root.startswith("file://"):
            raise IcebergUnavailable(f"[archive] iceberg needs a local or s3:// root, not {root!r}")
        else:
            self.fs = None
            local = Path(root.removeprefix("file://")).resolve()
            (local / "_iceberg").mkdir(parents=True, exist_ok=True)
            self.root = str(local)
            warehouse = (local / "_iceberg").as_uri()
        try:
            from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415 - optional extra
        except ImportError as exc:
            raise IcebergUnavailable(
                "[archive] iceberg = true needs pyiceberg: "
                "pip install 'switchboard-inbound[iceberg]'"
            ) from exc
        self.catalog = SqlCatalog(NAMESPACE, uri=catalog_url, warehouse=warehouse, **properties)
        self.catalog.create_namespace_if_not_exists(NAMESPACE)
        self.table: Any = self.catalog.create_table_if_not_exists(TABLE, schema=SCHEMA)
        # Columns are only ever added to the archive's schema (display_name was).
        with self.table.update_schema() as update:
            update.union_by_name(SCHEMA)

    def files(self) -> set[str]:
        """The archive's Parquet files, as the table names them (temporary ones,
        whose names start with a dot, are not files of the archive yet)."""
        if self.fs is None:
            found = Path(self.root).glob("topic=*/date=*/*.parquet")
            return {str(p) for p in found if not p.name.startswith(".")}
        self.fs.invalidate_cache()
        pattern = f"{self.root.removeprefix('s3://')}/topic=*/date=*/*.parquet"
        return {
            f"s3://{p}" for p in self.fs.glob(pattern) if not p.rsplit("/", 1)[-1].startswith(".")
        }

    def registered(self) -> dict[str, Any]:
        """Path -> DataFile of the table's current snapshot."""
        self.table = self.catalog.load_table(TABLE)
        found: dict[str, Any] = {}
        for task in self.table.scan().plan_files():
            found[task.file.file_path] = task.file
        return found

    def sync(self) -> tuple[int, int]:
        """Make the table's files the archive's files; returns (added, removed)."""
        present = self.files()
        registered = self.registered()
        gone = [f for path, f in registered.items() if path not in present]
        new = sorted(present - set(registered))
        if not new and not gone:
            return 0, 0
        with self.table.transaction() as tx:
            if gone:
                with tx.update_snapshot().overwrite() as overwrite:
                    for data_file in gone:
                        overwrite.delete_data_file(data_file)
            if new:
                tx.add_files(new)
        log.info("iceberg table synced", extra={"added": len(new), "removed": len(gone)})
        return len(new), len(gone)
