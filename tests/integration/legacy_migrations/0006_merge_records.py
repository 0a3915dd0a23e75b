"""Merges an agent can undo: every merge is recorded with what the merged-away
contact had, messages remember the identities they came through, and the queue read
model keeps the facts of an unmerge for events that arrive after it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Messages routed before this revision have no identity keys: an unmerge
    # leaves those that arrived during the merge with the survivor.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("identity_keys", sa.Text))
    op.create_table(
        "contact_merges",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("survivor_id", sa.Uuid, nullable=False),
        sa.Column("merged_id", sa.Uuid, nullable=False),
        sa.Column("merged_at", _TS, nullable=False),
        sa.Column("by", sa.String(128)),
        sa.Column("message_id", sa.Uuid),
        sa.Column("undone_at", _TS),
        sa.Column("undone_by", sa.String(128)),
    )
    op.create_index("ix_contact_merges_merged", "contact_merges", ["merged_id"])
    op.create_table(
        "contact_merge_items",
        sa.Column("merge_id", sa.Uuid, sa.ForeignKey("contact_merges.id"), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("ref", sa.String(400), primary_key=True),
    )
    op.create_table(
        "queue_unmerges",
        sa.Column("contact_id", sa.Uuid, primary_key=True),
        sa.Column("unmerged_at", _TS, nullable=False),
    )
    op.create_table(
        "queue_unmerged_conversations",
        sa.Column("conversation_id", sa.Uuid, primary_key=True),
        sa.Column("contact_id", sa.Uuid, nullable=False),
    )
    op.create_table(
        "queue_unmerged_messages",
        sa.Column("message_id", sa.Uuid, primary_key=True),
        sa.Column("conversation_id", sa.Uuid, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("queue_unmerged_messages")
    op.drop_table("queue_unmerged_conversations")
    op.drop_table("queue_unmerges")
    op.drop_table("contact_merge_items")
    op.drop_index("ix_contact_merges_merged", "contact_merges")
    op.drop_table("contact_merges")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("identity_keys")
