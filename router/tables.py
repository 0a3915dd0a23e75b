"""The router's tables: the contact directory (contacts, identities, owners,
conversations, messages, dedupe keys), the outbox of recorded events, and the
merge records. Each job of the router reads and writes them in its own module
(:mod:`router.directory`, :mod:`router.apply`, :mod:`router.merges`,
:mod:`router.outbox`); nothing outside ``router/`` needs them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
)

_TS = DateTime(timezone=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were stored as UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


metadata = MetaData()

contacts = Table(
    "contacts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_at", _TS, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("merged_into", Uuid, ForeignKey("contacts.id")),
    Column("merged_at", _TS),
    Column("updated_at", _TS, nullable=False),
    Index("ix_contacts_owner", "owner"),
    Index("ix_contacts_merged_into", "merged_into"),
)
identities = Table(
    "contact_identities",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("linked_at", _TS, nullable=False),
    Column("message_id", Uuid),
    Index("ix_contact_identities_contact", "contact_id"),
)
owners = Table(
    "owners",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("kind", String(8), nullable=False),  # agent | team
    Column("team", String(128), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("rr_next", Integer, nullable=False),  # teams: the round-robin cursor
    Column("updated_at", _TS, nullable=False),
)
conversations = Table(
    "conversations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("started_at", _TS, nullable=False),
    Column("last_message_at", _TS, nullable=False),
    Column("message_count", Integer, nullable=False),
    # The contact's owner, kept with every owner change, merge and unmerge: an
    # agent's open conversations are a range of ix_conversations_owner_last. (On
    # SQLite router_0003 left the column a default of '' to avoid a table rebuild:
    # an insert there that forgets the owner is not refused, so every insert sets it.)
    Column("owner", String(128), nullable=False),
    Index("ix_conversations_contact_last", "contact_id", "last_message_at"),
    Index("ix_conversations_owner_last", "owner", "last_message_at"),
)
messages = Table(
    "messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("dedupe_key", String(1024), nullable=False),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("conversation_id", Uuid, ForeignKey("conversations.id"), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("email_message_id", String(998)),
    Column("received_at", _TS, nullable=False),
    Column("routed_at", _TS, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("reason", String(160), nullable=False),
    # Every identity the message carried (keys, sender first, one per line): an
    # unmerge gives back to a contact the messages that arrived through its
    # identities while it was merged.
    Column("identity_keys", Text),
    Index("ix_messages_contact_email_id", "contact_id", "email_message_id"),
    Index("ix_messages_email_id", "email_message_id"),
    Index("ix_messages_conversation", "conversation_id"),
)
inboxes = Table(
    "message_inboxes",
    metadata,
    Column("message_id", Uuid, ForeignKey("messages.id"), primary_key=True),
    Column("inbox", String(400), primary_key=True),
    Column("first_seen_at", _TS, nullable=False),
)
dedupe_keys = Table(
    "dedupe_keys",
    metadata,
    Column("key", String(1024), primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("seen_at", _TS, nullable=False),
    Index("ix_dedupe_keys_seen_at", "seen_at"),
)
outbox = Table(
    "router_events",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("message_id", Uuid),  # None for events not caused by a message (manual assign)
    Column("seq", Integer, nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", String(400), nullable=False),
    Column("type", String(128), nullable=False),
    Column("source", String(255), nullable=False),
    Column("time", _TS, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("pending", Boolean, nullable=False),  # True: not yet known to be on Kafka
    Index("ix_router_events_message", "message_id", "seq"),
    Index("ix_router_events_pending", "pending"),
    Index("ix_router_events_time", "time"),
)

# Every merge, automatic or an agent's, with what the merged-away contact had at
# that moment, so an agent can undo it (:meth:`RouterStore.unmerge`).
merges = Table(
    "contact_merges",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("survivor_id", Uuid, nullable=False),
    Column("merged_id", Uuid, nullable=False),
    Column("merged_at", _TS, nullable=False),
    Column("by", String(128)),  # the agent; None for the router (then message_id)
    Column("message_id", Uuid),
    Column("undone_at", _TS),
    Column("undone_by", String(128)),
    Index("ix_contact_merges_merged", "merged_id"),
)
merge_items = Table(
    "contact_merge_items",
    metadata,
    Column("merge_id", Uuid, ForeignKey("contact_merges.id"), primary_key=True),
    # identity (a key) | conversation | message | contact (merged into it before)
    Column("kind", String(16), primary_key=True),
    Column("ref", String(400), primary_key=True),
)


DEFERRED = (messages, inboxes, dedupe_keys, outbox)
