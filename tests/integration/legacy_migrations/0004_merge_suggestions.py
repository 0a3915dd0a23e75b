"""Merge suggestions in the queue read model (built from merge.suggested and
merge.dismissed on the contacts topic).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "queue_merge_suggestions",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("contact_id", sa.Uuid, nullable=False),
        sa.Column("other_contact_id", sa.Uuid, nullable=False),
        sa.Column("identity", sa.String(400), nullable=False),
        sa.Column("message_id", sa.Uuid),
        sa.Column("suggested_at", _TS, nullable=False),
        sa.Column("dismissed_at", _TS),
        sa.Column("dismissed_by", sa.String(128)),
    )
    op.create_index("ix_queue_merge_suggestions_contact", "queue_merge_suggestions", ["contact_id"])
    op.create_index(
        "ix_queue_merge_suggestions_other", "queue_merge_suggestions", ["other_contact_id"]
    )


def downgrade() -> None:
    op.drop_table("queue_merge_suggestions")
