"""Migrations on a fresh SQLite file and a fresh PostgreSQL schema, and model drift."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, inspect

from ingest.imap_state import metadata as imap_metadata
from router.store import metadata as router_metadata
from sinks.queue import metadata as queue_metadata
from switchboard.db import current_revision, head_revision, make_engine, upgrade

pytestmark = pytest.mark.integration


def _check(engine: Engine) -> None:
    assert current_revision(engine) is None
    assert upgrade(engine) == head_revision()
    assert upgrade(engine) == head_revision()  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert {"imap_checkpoints", "imap_status", "alembic_version", "contacts"} <= tables
    # The models the code uses and the migrations agree, column for column.
    models = MetaData()
    for part in (imap_metadata, router_metadata, queue_metadata):
        for table in part.tables.values():
            table.to_metadata(models)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), models)
    assert diff == [], diff


def test_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        _check(engine)
    finally:
        engine.dispose()


def test_postgres(postgres_schema_url: str) -> None:
    engine = make_engine(postgres_schema_url)
    try:
        _check(engine)
    finally:
        engine.dispose()


def test_processes_starting_together_migrate_once(postgres_schema_url: str) -> None:
    """Four routers starting at once: one migrates, the others wait and find it done."""
    engines = [make_engine(postgres_schema_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            revisions = list(pool.map(upgrade, engines))
        assert revisions == [head_revision()] * 4
    finally:
        for engine in engines:
            engine.dispose()
