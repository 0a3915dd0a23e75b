"""Reading an archive as an analyst does: DuckDB over the Parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb


def query(root: Path | str, sql: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` with a view ``events`` over every archive file under ``root``."""
    connection = duckdb.connect(":memory:")
    try:
        files = f"{root}/**/*.parquet".replace("'", "''")
        view = (
            "CREATE TEMP VIEW events AS SELECT * FROM "  # noqa: S608 - the test's own path
            f"read_parquet('{files}', union_by_name = true)"
        )
        connection.execute(view)
        return connection.execute(sql).fetchall()
    finally:
        connection.close()
