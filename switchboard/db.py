"""SQLAlchemy engine factory (SQLite by default, PostgreSQL in production) and the
migration runner: each stage brings its own chain (:class:`Chain`); the application
decides which chains a database gets (``switchboard.databases``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
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
    sqlite_cache_mb: int = 0,
    **kwargs: Any,  # noqa: ANN401 - create_engine's options
) -> Engine:
    """Build an engine with durable, concurrent-friendly defaults for its backend.

    SQLite: transactions are begun explicitly (the documented pysqlite recipe),
    which SAVEPOINT needs; ``sqlite_immediate`` begins them with ``BEGIN
    IMMEDIATE`` so a writer takes the write lock up front instead of failing to
    upgrade a read lock later (SQLITE_BUSY without waiting). ``sqlite_cache_mb``:
    each connection's page cache may grow to this (0: SQLite's default, 2 MB).
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
            if sqlite_cache_mb:
                cursor.execute(f"PRAGMA cache_size=-{int(sqlite_cache_mb) * 1024}")
            cursor.close()
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below

        begin = "BEGIN IMMEDIATE" if sqlite_immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:  # noqa: ANN401 - a SQLAlchemy Connection
            connection.exec_driver_sql(begin)

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


#: env.py and the script template, shared by every stage's chain.
MIGRATIONS = Path(__file__).with_name("migrations")
#: The version table of the single chain (revisions 0001-0007) that built every
#: table in every database until the stages got chains of their own. Never written
#: again; read once per chain to adopt a database it built (see :func:`migrate`).
LEGACY_VERSION_TABLE = "alembic_version"
_MIGRATION_LOCK = 0x5357424D49475254  # "SWBMIGRT": one migrator at a time on PostgreSQL


@dataclass(frozen=True)
class Chain:
    """One stage's migrations: its scripts (in the stage's package) and a version
    table of its own, so a database holds the tables of the stages that use it and
    no other. ``legacy`` maps each revision of the old single chain to this chain's
    revision that leaves this stage's tables as that revision did (None: none yet)."""

    stage: str
    versions: Path
    legacy: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.stage}"


def _alembic_config(connection: Any, chain: Chain) -> Config:  # noqa: ANN401 - a Connection
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(chain.versions))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = chain.version_table
    return config


def migrate(engine: Engine, chains: Iterable[Chain]) -> dict[str, str | None]:
    """Apply every pending migration of these chains; their revisions afterwards."""
    chains = list(chains)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several processes starting at once (replicas, `switchboard router` x4)
            # would race to create the same tables: one migrates, the others wait
            # and find nothing left to do. Released at commit.
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        for chain in chains:
            _adopt_legacy(connection, chain)
            command.upgrade(_alembic_config(connection, chain), "head")
    return {chain.stage: current_revision(engine, chain) for chain in chains}


def _adopt_legacy(connection: Connection, chain: Chain) -> None:
    """A database the single chain built already has this stage's tables up to some
    revision: stamp the stage's chain there instead of creating them again."""
    tables = set(inspect(connection).get_table_names())
    if chain.version_table in tables or LEGACY_VERSION_TABLE not in tables:
        return
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    if not rows:
        return
    legacy = str(rows[0][0])
    if len(rows) > 1 or legacy not in chain.legacy:
        raise RuntimeError(
            f"{LEGACY_VERSION_TABLE} is at {', '.join(str(r[0]) for r in rows)}, a revision "
            f"the {chain.stage} migrations do not know: upgrade with the release that wrote it"
        )
    revision = chain.legacy[legacy]
    if revision is not None:
        command.stamp(_alembic_config(connection, chain), revision)


def current_revision(engine: Engine, chain: Chain) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": chain.version_table}
        )
        revision: str | None = context.get_current_revision()
        return revision


def head_revision(chain: Chain) -> str | None:
    script = ScriptDirectory.from_config(_alembic_config(None, chain))
    head: str | None = script.get_current_head()
    return head


def ping(engine: Engine) -> None:
    """Raise if the database does not answer a trivial query."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
