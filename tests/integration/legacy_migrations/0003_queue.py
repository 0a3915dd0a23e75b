"""The unified queue's read model (built from the routed and contacts topics).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "queue_applied",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("applied_at", _TS, nullable=False),
    )
    op.create_table(
        "queue_contacts",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("owner_at", _TS, nullable=False),
        sa.Column("merged_into", sa.Uuid),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "queue_identities",
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("contact_id", sa.Uuid, nullable=False),
    )
    op.create_index("ix_queue_identities_contact", "queue_identities", ["contact_id"])
    op.create_table(
        "queue_conversations",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("contact_id", sa.Uuid, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("channels", sa.JSON, nullable=False),
        sa.Column("oldest_unanswered_at", _TS),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("last_message_at", _TS, nullable=False),
        sa.Column("status_at", _TS),
        sa.Column("last_preview", sa.String(200)),
        sa.Column("message_count", sa.Integer, nullable=False),
    )
    op.create_index(
        "ix_queue_conversations_owner",
        "queue_conversations",
        ["owner", "status", "oldest_unanswered_at"],
    )
    op.create_index("ix_queue_conversations_contact", "queue_conversations", ["contact_id"])
    op.create_table(
        "queue_messages",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("conversation_id", sa.Uuid, nullable=False),
        sa.Column("contact_id", sa.Uuid, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("sender", sa.String(400), nullable=False),
        sa.Column("sender_name", sa.String(256)),
        sa.Column("subject", sa.String(998)),
        sa.Column("text", sa.Text),
        sa.Column("text_new", sa.Text),
        sa.Column("html", sa.Text),
        sa.Column("attachments", sa.JSON, nullable=False),
        sa.Column("auto_reply", sa.Boolean, nullable=False),
        sa.Column("bounce", sa.Boolean, nullable=False),
        sa.Column("inboxes", sa.JSON, nullable=False),
    )
    op.create_index(
        "ix_queue_messages_conversation", "queue_messages", ["conversation_id", "received_at"]
    )
    op.create_index("ix_queue_messages_contact", "queue_messages", ["contact_id"])


def downgrade() -> None:
    for table in (
        "queue_messages",
        "queue_conversations",
        "queue_identities",
        "queue_contacts",
        "queue_applied",
    ):
        op.drop_table(table)
