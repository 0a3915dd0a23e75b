"""Which stage's tables live in which database, and bringing them up to date.

Each stage owns its tables and their migrations: ``ingest/migrations`` (IMAP
state), ``router/migrations`` (the contact directory), ``sinks/migrations`` (the
queue read model), each an Alembic chain with a version table of its own
(``alembic_version_ingest``, ``_router``, ``_queue``).

Why chains with their own version tables rather than branches of one chain:
branches share one script directory and one version table, so every database
would carry every stage's bookkeeping and a stage's script could come to depend
on another stage's revision without anyone noticing; a chain per stage can only
see its own scripts, moves with its stage, and a database holds the version
tables of exactly the stages it serves. The process database holds ingest's and
the router's tables, and the queue's unless the queue has a database of its own
(``SWITCHBOARD_QUEUE_DATABASE_URL``), which then gets the queue's and no other.

Databases built by the single chain this replaced (revisions 0001-0007 in
``alembic_version``) are adopted in place: each chain is stamped at the revision
that chain had reached there (``switchboard.db.migrate``) and continues from it.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine

from ingest.migrations import CHAIN as INGEST
from router.migrations import CHAIN as ROUTER
from sinks.migrations import CHAIN as QUEUE
from switchboard.db import Chain, current_revision, head_revision, migrate
from switchboard.settings import Settings

CHAINS: dict[str, Chain] = {chain.stage: chain for chain in (INGEST, ROUTER, QUEUE)}
STAGES = tuple(CHAINS)


def upgrade(engine: Engine, stages: Iterable[str] = STAGES) -> dict[str, str | None]:
    """Apply the pending migrations of these stages; each one's revision afterwards."""
    return migrate(engine, [CHAINS[stage] for stage in stages])


def head_revisions(stages: Iterable[str] = STAGES) -> dict[str, str | None]:
    return {stage: head_revision(CHAINS[stage]) for stage in stages}


def current_revisions(engine: Engine, stages: Iterable[str] = STAGES) -> dict[str, str | None]:
    return {stage: current_revision(engine, CHAINS[stage]) for stage in stages}


def process_database_stages(settings: Settings) -> tuple[str, ...]:
    """The stages whose tables live in the process database (``database_url``)."""
    if settings.queue_database_url is None:
        return STAGES
    return tuple(stage for stage in STAGES if stage != "queue")


def upgrade_databases(
    settings: Settings, engine: Engine, queue_engine: Engine | None = None
) -> dict[str, str | None]:
    """The process database, and the queue's own if it has one (``queue_engine``)."""
    revisions = upgrade(engine, process_database_stages(settings))
    if settings.queue_database_url is not None and queue_engine is not None:
        revisions |= upgrade(queue_engine, ["queue"])
    return revisions


def describe(revisions: dict[str, str | None]) -> str:
    """``ingest ingest_0002, queue queue_0009, router router_0003``."""
    return ", ".join(f"{stage} {revisions[stage] or 'none'}" for stage in sorted(revisions))
