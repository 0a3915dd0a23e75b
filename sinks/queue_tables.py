"""The queue read model's tables (built only from the topics; see
:mod:`sinks.queue`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    bindparam,
    false,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from sinks import suggestions

_TS = DateTime(timezone=True)
PREVIEW = 200
# Sorts after every real time: "nobody waits" in a keyset column that cannot be NULL.
FAR = datetime(9999, 1, 1, tzinfo=UTC)
FAR_SQL = "9999-01-01 00:00:00+00:00"

metadata = MetaData()

applied = Table(
    "queue_applied",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("applied_at", _TS, nullable=False),
)
q_contacts = Table(
    "queue_contacts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("owner_at", _TS, nullable=False),
    Column("merged_into", Uuid),
    Column("created_at", _TS, nullable=False),
    # The contact's work, kept from its conversations by every event that touches
    # them (see QueueWriter._refresh_contacts), so an owner's queue of customers is
    # one keyset range of ix_queue_contacts_work instead of a GROUP BY over every
    # conversation: work is 'open' (an open conversation), else 'waiting' (on the
    # customer), else 'closed', NULL without conversations (merged away).
    Column("work", String(8)),
    Column("open_count", Integer, nullable=False, server_default="0"),
    Column("waiting_since", _TS),
    Column("wait_key", _TS, nullable=False, server_default=FAR_SQL),
    Column("last_activity", _TS),
    # When the merge that set merged_into happened (NULL: live, or merged before
    # migration queue_0008): an unmerge older than it is stale (see _unmerge).
    Column("merged_at", _TS),
    Index("ix_queue_contacts_work", "owner", "work", "wait_key", "last_activity", "id"),
)
q_identities = Table(
    "queue_identities",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("contact_id", Uuid, nullable=False),
    # The time of the event that put the key there: an older event applied later
    # (partitions interleave) leaves it (NULL: linked before migration queue_0008).
    Column("linked_at", _TS),
    Index("ix_queue_identities_contact", "contact_id"),
)
q_conversations = Table(
    "queue_conversations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("contact_id", Uuid, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # open | waiting | closed
    Column("channels", JSON, nullable=False),
    Column("oldest_unanswered_at", _TS),
    Column("started_at", _TS, nullable=False),
    Column("last_message_at", _TS, nullable=False),
    Column("status_at", _TS),
    Column("last_preview", String(PREVIEW)),
    Column("message_count", Integer, nullable=False),
    Index("ix_queue_conversations_owner", "owner", "status", "oldest_unanswered_at"),
    Index("ix_queue_conversations_contact", "contact_id"),
)
q_messages = Table(
    "queue_messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("conversation_id", Uuid, nullable=False),
    Column("contact_id", Uuid, nullable=False),
    Column("received_at", _TS, nullable=False),
    Column("channel", String(32), nullable=False),
    Column("sender", String(400), nullable=False),
    Column("sender_name", String(256)),
    Column("subject", String(998)),
    Column("text", Text),
    Column("text_new", Text),
    Column("html", Text),
    Column("attachments", JSON, nullable=False),
    Column("auto_reply", Boolean, nullable=False),
    Column("bounce", Boolean, nullable=False),
    Column("inboxes", JSON, nullable=False),
    # Whether the channel proved the sender (revision 2 of the schema), and how.
    Column("sender_verified", Boolean, nullable=False, server_default=false()),
    Column("sender_evidence", String(200)),
    # The other identities the channel proved on this message (a vouching hook's
    # phone beside its email), sorted and one per line; NULL when none.
    Column("verified_keys", Text),
    Column("authentication", JSON),
    # Email threading, for the agent's reply link (In-Reply-To, References).
    Column("mail_message_id", String(998)),
    Column("mail_references", Text),
    Index("ix_queue_messages_conversation", "conversation_id", "received_at"),
    Index("ix_queue_messages_contact", "contact_id"),
)
# One row per stored attachment blob of a message, for look-ups by digest.
q_attachments = Table(
    "queue_attachments",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("message_id", Uuid, primary_key=True),
    Column("attachment", JSON, nullable=False),
)
# What an unmerge decided, for the events that arrive after it (their partitions
# lag): the latest unmerge of a contact (an older merge of it is then stale), the
# contact a conversation went back to, and the conversation a message moved to.
q_unmerges = Table(
    "queue_unmerges",
    metadata,
    Column("contact_id", Uuid, primary_key=True),
    Column("unmerged_at", _TS, nullable=False),
)
q_unmerged_conversations = Table(
    "queue_unmerged_conversations",
    metadata,
    Column("conversation_id", Uuid, primary_key=True),
    Column("contact_id", Uuid, nullable=False),
)
q_unmerged_messages = Table(
    "queue_unmerged_messages",
    metadata,
    Column("message_id", Uuid, primary_key=True),
    Column("conversation_id", Uuid, nullable=False),
)
TABLES = (
    applied,
    q_messages,
    q_conversations,
    q_identities,
    q_contacts,
    suggestions.suggestions,
    q_attachments,
    q_unmerges,
    q_unmerged_conversations,
    q_unmerged_messages,
)


# Statements the sink runs for every event are built once and reused: building a
# statement and its cache key took more of the sink's time than running it.
_SURVIVOR = select(q_contacts.c.merged_into).where(q_contacts.c.id == bindparam("id"))


def survivor(c: Connection, contact_id: UUID) -> UUID:
    """The contact a (possibly merged-away) contact lives on as, in the read model."""
    merged = c.execute(_SURVIVOR, {"id": contact_id}).scalar()
    return UUID(str(merged)) if merged else contact_id


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _upsert_ignore(c: Connection, table: Table, row: dict[str, Any]) -> bool:
    """Insert unless the primary key exists; True if inserted.

    Asks with RETURNING: ``rowcount`` of ``ON CONFLICT DO NOTHING`` is -1 (truthy)
    through SQLAlchemy 2.1 + psycopg 3, which made every replayed event look new.
    """
    # The row's keys name the columns (the statement has no VALUES of its own).
    return c.execute(_insert_ignoring(c, table), row).first() is not None


def _insert_ignoring(c: Connection, table: Table) -> Any:  # noqa: ANN401 - an Insert
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING`` the primary key, built once
    per dialect and table: executed with many rows, it returns the inserted ones."""
    key = (c.dialect.name, table.name)
    statement = _IGNORING.get(key)
    if statement is None:
        dialect = postgresql if c.dialect.name == "postgresql" else sqlite
        statement = (
            dialect.insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)
        )
        _IGNORING[key] = statement
    return statement


_IGNORING: dict[tuple[str, str], Any] = {}


def _now() -> datetime:
    return datetime.now(UTC)
