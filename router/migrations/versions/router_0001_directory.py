"""The router's contact directory: contacts, identities, owners, conversations,
messages, dedupe keys and the events it emitted.

Revision ID: router_0001 (was 0002 of the single chain)
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "router_0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("merged_into", sa.Uuid, sa.ForeignKey("contacts.id")),
        sa.Column("merged_at", _TS),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_index("ix_contacts_owner", "contacts", ["owner"])
    op.create_index("ix_contacts_merged_into", "contacts", ["merged_into"])
    op.create_table(
        "contact_identities",
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("contact_id", sa.Uuid, sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("linked_at", _TS, nullable=False),
        sa.Column("message_id", sa.Uuid),
    )
    op.create_index("ix_contact_identities_contact", "contact_identities", ["contact_id"])
    op.create_table(
        "owners",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("rr_next", sa.Integer, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("contact_id", sa.Uuid, sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("last_message_at", _TS, nullable=False),
        sa.Column("message_count", sa.Integer, nullable=False),
    )
    op.create_index(
        "ix_conversations_contact_last", "conversations", ["contact_id", "last_message_at"]
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("dedupe_key", sa.String(1024), nullable=False),
        sa.Column("contact_id", sa.Uuid, sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("conversation_id", sa.Uuid, sa.ForeignKey("conversations.id"), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("email_message_id", sa.String(998)),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("routed_at", _TS, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(160), nullable=False),
    )
    op.create_index("ix_messages_contact_email_id", "messages", ["contact_id", "email_message_id"])
    op.create_index("ix_messages_email_id", "messages", ["email_message_id"])
    op.create_index("ix_messages_conversation", "messages", ["conversation_id"])
    op.create_table(
        "message_inboxes",
        sa.Column("message_id", sa.Uuid, sa.ForeignKey("messages.id"), primary_key=True),
        sa.Column("inbox", sa.String(400), primary_key=True),
        sa.Column("first_seen_at", _TS, nullable=False),
    )
    op.create_table(
        "dedupe_keys",
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("seen_at", _TS, nullable=False),
    )
    op.create_index("ix_dedupe_keys_seen_at", "dedupe_keys", ["seen_at"])
    op.create_table(
        "router_events",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("message_id", sa.Uuid),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("time", _TS, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("pending", sa.Boolean, nullable=False),
    )
    op.create_index("ix_router_events_message", "router_events", ["message_id", "seq"])
    op.create_index("ix_router_events_pending", "router_events", ["pending"])
    op.create_index("ix_router_events_time", "router_events", ["time"])


def downgrade() -> None:
    for table in (
        "router_events",
        "dedupe_keys",
        "message_inboxes",
        "messages",
        "conversations",
        "owners",
        "contact_identities",
        "contacts",
    ):
        op.drop_table(table)
