"""Merges an agent can undo: every merge is recorded with what the merged-away
contact had, and messages remember the identities they came through. (The queue's
half of the single chain's 0006 is queue_0004.)

Revision ID: router_0002 (was 0006 of the single chain, the router's half)
Revises: router_0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "router_0002"
down_revision = "router_0001"
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


def downgrade() -> None:
    op.drop_table("contact_merge_items")
    op.drop_index("ix_contact_merges_merged", "contact_merges")
    op.drop_table("contact_merges")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("identity_keys")
