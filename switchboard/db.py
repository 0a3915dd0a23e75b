"""SQLAlchemy engine factory: SQLite by default, PostgreSQL in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url


def normalize_url(url: str) -> str:
    """Pick psycopg 3 for bare ``postgresql://`` URLs (SQLAlchemy defaults to psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(
    url: str,
    *,
    sqlite_immediate: bool = False,
    **kwargs: Any,  # noqa: ANN401 - create_engine's options
) -> Engine:
    """Build an engine with durable, concurrent-friendly defaults for its backend.

    SQLite: transactions are begun explicitly (the documented pysqlite recipe),
    which SAVEPOINT needs; ``sqlite_immediate`` begins them with ``BEGIN
    IMMEDIATE`` so a writer takes the write lock up front instead of failing to
    upgrade a read lock later (SQLITE_BUSY without waiting).
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: object) -> None:  # noqa: ANN401 - DB-API
            cursor = dbapi_connection.cursor()
            # WAL lets readers (the API) run beside the writer; synchronous=FULL keeps
            # a committed transaction on disk across a power loss.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below

        begin = "BEGIN IMMEDIATE" if sqlite_immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:  # noqa: ANN401 - a SQLAlchemy Connection
            connection.exec_driver_sql(begin)

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x5357424D49475254  # "SWBMIGRT": one migrator at a time on PostgreSQL


def _alembic_config(connection: Any) -> Config:  # noqa: ANN401 - a SQLAlchemy Connection
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> str | None:
    """Apply every pending migration; return the revision the database is at."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several processes starting at once (replicas, `switchboard router` x4)
            # would race to create the same tables: one migrates, the others wait
            # and find nothing left to do. Released at commit.
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        command.upgrade(_alembic_config(connection), "head")
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        revision: str | None = MigrationContext.configure(connection).get_current_revision()
        return revision


def head_revision() -> str | None:
    head: str | None = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    return head


def ping(engine: Engine) -> None:
    """Raise if the database does not answer a trivial query."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
