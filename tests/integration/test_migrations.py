"""Migrations per stage on SQLite and PostgreSQL: fresh databases, a queue database of
its own, databases built by the single chain this replaced, and model drift."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import Engine, MetaData, event, inspect

from ingest.imap_state import metadata as imap_metadata
from ingest.replay import metadata as replay_metadata
from router.migrations import CHAIN as ROUTER_CHAIN
from router.tables import metadata as router_metadata
from sinks.agents import metadata as agents_metadata
from sinks.migrations import CHAIN as QUEUE_CHAIN
from sinks.queue import metadata as queue_metadata
from sinks.suggestions import metadata as suggestions_metadata
from switchboard.databases import current_revisions, head_revisions, upgrade, upgrade_databases
from switchboard.db import LEGACY_VERSION_TABLE, MIGRATIONS, Chain, _alembic_config, make_engine
from switchboard.settings import Settings

pytestmark = pytest.mark.integration

#: The single chain as it was at 0007, frozen: what existing databases were built by.
LEGACY = Path(__file__).with_name("legacy_migrations")
VERSION_TABLES = {"alembic_version_ingest", "alembic_version_router", "alembic_version_queue"}
METADATA = {
    "ingest": [imap_metadata, replay_metadata],
    "router": [router_metadata],
    "queue": [queue_metadata, suggestions_metadata, agents_metadata],
}
TABLES = {
    stage: {name for part in parts for name in part.tables} for stage, parts in METADATA.items()
}
#: The queue's revisions after the split (queue_0006) create these on any database.
AGENTS = {"agents", "agent_tokens", "agent_sessions"}
#: And ingest's after the split (ingest_0002): the used signature tokens.
TOKENS = {"webhook_tokens"}
T0 = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
SHA = "ab" * 32


def _searching(name: str | None, kind: str = "table") -> bool:
    """SQLite's FTS5 table for search and its shadow tables (not in the models)."""
    return kind == "table" and str(name).startswith("queue_search")


def _tables(engine: Engine) -> set[str]:
    return {name for name in inspect(engine).get_table_names() if not _searching(name)}


def _drift(engine: Engine, stages: tuple[str, ...] = tuple(METADATA)) -> list[Any]:
    """The models the code uses against the database, column for column."""
    models = MetaData()
    for stage in stages:
        for part in METADATA[stage]:
            for table in part.tables.values():
                table.to_metadata(models)

    def ours(_obj: object, name: str | None, kind: str, _reflected: bool, _to: object) -> bool:
        return not (kind == "table" and (name or "").startswith(LEGACY_VERSION_TABLE))

    # Full-text search lives outside the models: an FTS5 table and its shadow
    # tables on SQLite, an expression index on PostgreSQL (sinks/search.py).
    def modelled(name: str | None, kind: str, _parent: object) -> bool:
        return not _searching(name, kind) and name != "ix_queue_messages_search"

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": ours, "include_name": modelled}
        )
        return list(compare_metadata(context, models))


@contextmanager
def _created_tables(engine: Engine) -> Iterator[list[str]]:
    """The tables each CREATE TABLE sent to the database names, in order; not the
    copies a batch migration on SQLite rebuilds a table in (``_alembic_tmp_*``,
    renamed to the table at once)."""
    created: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        words = statement.split()
        if [w.upper() for w in words[:2]] == ["CREATE", "TABLE"]:
            name = words[2].strip('"')
            if not name.startswith("_alembic_tmp_"):
                created.append(name)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield created
    finally:
        event.remove(engine, "before_cursor_execute", seen)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'switchboard.db'}"
    value: str = request.getfixturevalue("postgres_schema_url")
    return value


def test_a_fresh_database_gets_every_stage_once(url: str) -> None:
    engine = make_engine(url)
    try:
        assert set(current_revisions(engine).values()) == {None}
        with _created_tables(engine) as created:
            assert upgrade(engine) == head_revisions()
            assert upgrade(engine) == head_revisions()  # idempotent
        assert sorted(created) == sorted(set(created))  # nothing created twice
        assert _tables(engine) == set().union(*TABLES.values()) | VERSION_TABLES
        assert _drift(engine) == []
    finally:
        engine.dispose()


def test_a_queue_database_of_its_own_holds_only_the_queue(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        queue_database_url=SecretStr(f"sqlite:///{tmp_path / 'queue.db'}"),
    )
    engine = make_engine(settings.resolved_database_url())
    queue_engine = make_engine(settings.resolved_queue_database_url())
    try:
        revisions = upgrade_databases(settings, engine, queue_engine)
        assert revisions == head_revisions()
        assert _tables(queue_engine) == TABLES["queue"] | {"alembic_version_queue"}
        assert _tables(engine) == (
            TABLES["ingest"]
            | TABLES["router"]
            | {"alembic_version_ingest", "alembic_version_router"}
        )
        assert _drift(queue_engine, ("queue",)) == []
        assert _drift(engine, ("ingest", "router")) == []
    finally:
        engine.dispose()
        queue_engine.dispose()


def test_processes_starting_together_migrate_once(postgres_schema_url: str) -> None:
    """Four routers starting at once: one migrates, the others wait and find it done."""
    engines = [make_engine(postgres_schema_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            revisions = list(pool.map(upgrade, engines))
        assert revisions == [head_revisions()] * 4
    finally:
        for engine in engines:
            engine.dispose()


# -- databases the single chain built -------------------------------------------------


def _legacy_upgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("path_separator", "os")
        config.set_main_option("version_locations", str(LEGACY))
        config.attributes["connection"] = connection
        config.attributes["version_table"] = LEGACY_VERSION_TABLE
        command.upgrade(config, revision)


CONTACT, MESSAGE, CONVERSATION = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
_imap = sa.table(
    "imap_checkpoints",
    sa.column("mailbox", sa.String),
    sa.column("folder", sa.String),
    sa.column("uidvalidity", sa.BigInteger),
    sa.column("last_uid", sa.BigInteger),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
_contacts = sa.table(
    "contacts",
    sa.column("id", sa.Uuid),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("owner", sa.String),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
_identities = sa.table(
    "contact_identities",
    sa.column("key", sa.String),
    sa.column("contact_id", sa.Uuid),
    sa.column("kind", sa.String),
    sa.column("linked_at", sa.DateTime(timezone=True)),
)
_conversations = sa.table(
    "conversations",
    sa.column("id", sa.Uuid),
    sa.column("contact_id", sa.Uuid),
    sa.column("started_at", sa.DateTime(timezone=True)),
    sa.column("last_message_at", sa.DateTime(timezone=True)),
    sa.column("message_count", sa.Integer),
)
_router_messages = sa.table(
    "messages",
    sa.column("id", sa.Uuid),
    sa.column("dedupe_key", sa.String),
    sa.column("contact_id", sa.Uuid),
    sa.column("conversation_id", sa.Uuid),
    sa.column("channel", sa.String),
    sa.column("received_at", sa.DateTime(timezone=True)),
    sa.column("routed_at", sa.DateTime(timezone=True)),
    sa.column("owner", sa.String),
    sa.column("reason", sa.String),
)
_queue_messages = sa.table(
    "queue_messages",
    sa.column("id", sa.Uuid),
    sa.column("conversation_id", sa.Uuid),
    sa.column("contact_id", sa.Uuid),
    sa.column("received_at", sa.DateTime(timezone=True)),
    sa.column("channel", sa.String),
    sa.column("sender", sa.String),
    sa.column("attachments", sa.JSON),
    sa.column("auto_reply", sa.Boolean),
    sa.column("bounce", sa.Boolean),
    sa.column("inboxes", sa.JSON),
)
_queue_attachments = sa.table(
    "queue_attachments",
    sa.column("sha256", sa.String),
    sa.column("message_id", sa.Uuid),
    sa.column("attachment", sa.JSON),
)
ATTACHMENT = {"filename": "invoice.pdf", "size": 3, "blob": {"sha256": SHA, "size": 3}}


def _fill(engine: Engine, legacy: str) -> None:
    """A row in each stage's tables, as the code of that revision wrote them."""
    with engine.begin() as connection:
        connection.execute(
            sa.insert(_imap).values(
                mailbox="support", folder="INBOX", uidvalidity=7, last_uid=42, updated_at=T0
            )
        )
        connection.execute(
            sa.insert(_contacts).values(id=CONTACT, created_at=T0, owner="alice", updated_at=T0)
        )
        connection.execute(
            sa.insert(_identities).values(
                key="email:carol@customer.example", contact_id=CONTACT, kind="email", linked_at=T0
            )
        )
        connection.execute(
            sa.insert(_conversations).values(
                id=CONVERSATION,
                contact_id=CONTACT,
                started_at=T0,
                last_message_at=T0,
                message_count=1,
            )
        )
        # A routed message refers to the conversation: on SQLite (foreign keys on) a
        # migration may not rebuild the conversations table under it.
        connection.execute(
            sa.insert(_router_messages).values(
                id=MESSAGE,
                dedupe_key="email-mid:1@customer.example",
                contact_id=CONTACT,
                conversation_id=CONVERSATION,
                channel="email",
                received_at=T0,
                routed_at=T0,
                owner="alice",
                reason="default",
            )
        )
        connection.execute(
            sa.insert(_queue_messages).values(
                id=MESSAGE,
                conversation_id=CONVERSATION,
                contact_id=CONTACT,
                received_at=T0,
                channel="email",
                sender="email:carol@customer.example",
                attachments=[ATTACHMENT],
                auto_reply=False,
                bounce=False,
                inboxes=["email:support@example.com"],
            )
        )
        if legacy == "0007":  # the queue sink wrote the attachment rows itself
            connection.execute(
                sa.insert(_queue_attachments).values(
                    sha256=SHA, message_id=MESSAGE, attachment=ATTACHMENT
                )
            )


def _kept(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.execute(sa.select(_imap.c.last_uid)).scalar_one() == 42
        assert connection.execute(sa.select(_contacts.c.owner)).scalar_one() == "alice"
        assert connection.execute(sa.select(_identities.c.contact_id)).scalar_one() == CONTACT
        assert connection.execute(sa.select(_router_messages.c.id)).scalar_one() == MESSAGE
        # router_0003: a conversation carries its contact's owner.
        owner = sa.column("owner", sa.String)
        assert connection.execute(sa.select(owner).select_from(_conversations)).scalar_one() == (
            "alice"
        )
        assert connection.execute(sa.select(_queue_messages.c.id)).scalar_one() == MESSAGE
        found = connection.execute(sa.select(_queue_attachments)).one()
        assert (found.sha256, found.message_id) == (SHA, MESSAGE)


@pytest.mark.parametrize("legacy", ["0007", "0005"])
def test_a_database_of_the_single_chain_upgrades_in_place(url: str, legacy: str) -> None:
    """0007 was the head when the chain was split; 0005 is one a stage's chain must
    continue from on both sides of the split 0006."""
    engine = make_engine(url)
    try:
        _legacy_upgrade(engine, legacy)
        _fill(engine, legacy)
        before = _tables(engine)
        with _created_tables(engine) as created:
            assert upgrade(engine) == head_revisions()
        new = {"queue_attachments", "queue_unmerges", "contact_merges"}
        expected = VERSION_TABLES | AGENTS | TOKENS | (set() if legacy == "0007" else new)
        assert set(created) >= VERSION_TABLES
        assert not set(created) & (before - {LEGACY_VERSION_TABLE}), "a table was created twice"
        assert set(created) <= expected | {
            "contact_merge_items",
            "queue_unmerged_conversations",
            "queue_unmerged_messages",
        }
        assert _tables(engine) == set().union(*TABLES.values()) | VERSION_TABLES | {
            LEGACY_VERSION_TABLE
        }
        _kept(engine)
        assert _drift(engine) == []
        # The old version table is left as it was: a rolled-back release sees its
        # own head there and migrates nothing.
        with engine.connect() as connection:
            old = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert [r[0] for r in old] == [legacy]
        with _created_tables(engine) as again:
            assert upgrade(engine) == head_revisions()
        assert again == []
    finally:
        engine.dispose()


def test_a_queue_database_the_single_chain_built_keeps_what_it_has(url: str) -> None:
    """A separate queue database got every stage's tables from the single chain: the
    queue's chain adopts its own and leaves the others (and their rows) alone; a
    router that is later pointed at it adopts its tables too, creating none."""
    engine = make_engine(url)
    try:
        _legacy_upgrade(engine, "0007")
        _fill(engine, "0007")
        before = _tables(engine)
        with _created_tables(engine) as created:
            assert upgrade(engine, ["queue"]) == {"queue": head_revisions()["queue"]}
        # queue_0006 (agents) comes after the split: its tables are new here.
        assert sorted(created) == sorted({"alembic_version_queue"} | AGENTS)
        assert _tables(engine) == before | {"alembic_version_queue"} | AGENTS
        with _created_tables(engine) as created:
            upgrade(engine, ["router", "ingest"])
        assert sorted(created) == sorted(
            {"alembic_version_ingest", "alembic_version_router"} | TOKENS
        )
        _kept(engine)
    finally:
        engine.dispose()


def test_a_revision_the_stages_do_not_know_stops_the_upgrade(tmp_path: Path) -> None:
    """A database a newer single-chain release wrote (there is none, but a branch or a
    hand-made one) is refused rather than guessed at."""
    engine = make_engine(f"sqlite:///{tmp_path / 'odd.db'}")
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            connection.execute(sa.text("INSERT INTO alembic_version VALUES ('0099')"))
        with pytest.raises(RuntimeError, match="alembic_version is at 0099"):
            upgrade(engine)
        assert _tables(engine) == {LEGACY_VERSION_TABLE}  # rolled back, nothing made
    finally:
        engine.dispose()


def test_router_0003_goes_down_and_up_again_with_routed_messages(url: str) -> None:
    """The conversation owner's column leaves and comes back without rebuilding the
    table its routed messages refer to (SQLite, foreign keys on), and is filled
    again from the contacts."""
    _down_and_up(url, ROUTER_CHAIN, "router_0002", {"conversations": "owner"})


def _down_and_up(url: str, chain: Chain, down_to: str, gone: dict[str, str]) -> None:
    """A legacy database with a row in each stage, upgraded, taken down to
    ``down_to`` on ``chain`` (``gone``: the table and column that must leave), and
    up again: the rows kept and the tables as the models say."""
    engine = make_engine(url)
    try:
        _legacy_upgrade(engine, "0007")
        _fill(engine, "0007")
        assert upgrade(engine) == head_revisions()
        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection, chain), down_to)
        found = inspect(engine)
        for table, column in gone.items():
            assert column not in {c["name"] for c in found.get_columns(table)}
        assert upgrade(engine) == head_revisions()
        _kept(engine)
        assert _drift(engine) == []
    finally:
        engine.dispose()


def test_queue_0008_goes_down_and_up_again_keeping_the_rows(url: str) -> None:
    """The merge and link times leave in place (no table rebuilt under the queue's
    rows) and come back empty: NULL, "time unknown", which the sink reads as it
    read every row before them."""
    _down_and_up(
        url,
        QUEUE_CHAIN,
        "queue_0007",
        {"queue_contacts": "merged_at", "queue_identities": "linked_at"},
    )


def test_queue_0009_goes_down_and_up_again_keeping_the_rows(url: str) -> None:
    """The proved identities beside a message's sender leave in place and come back
    empty (NULL: none known, as for every message before them)."""
    _down_and_up(url, QUEUE_CHAIN, "queue_0008", {"queue_messages": "verified_keys"})
    engine = make_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("queue_messages")}
    finally:
        engine.dispose()
    assert "verified_keys" in columns  # back at the head (a review: without this line
    # the test passed on the code before the migration existed)
