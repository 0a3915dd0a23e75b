"""Single-use signature tokens (ingest.replay): Mailgun's, bound to their first message.

Revision ID: ingest_0002
Revises: ingest_0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_tokens",
        sa.Column("adapter", sa.String(64), primary_key=True),
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("message", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("conflicts", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_webhook_tokens_first_seen", "webhook_tokens", ["first_seen"])


def downgrade() -> None:
    op.drop_index("ix_webhook_tokens_first_seen", "webhook_tokens")
    op.drop_table("webhook_tokens")
