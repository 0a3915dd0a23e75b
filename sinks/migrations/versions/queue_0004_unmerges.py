"""The queue read model keeps the facts of an unmerge for events that arrive after
it. (The router's half of the single chain's 0006 is router_0002.)

Revision ID: queue_0004 (was 0006 of the single chain, the queue's half)
Revises: queue_0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queue_0004"
down_revision = "queue_0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
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
