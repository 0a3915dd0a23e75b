"""IMAP progress and mailbox state.

Revision ID: ingest_0001 (was 0001 of the single chain)
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ingest_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "imap_checkpoints",
        sa.Column("mailbox", sa.String(64), primary_key=True),
        sa.Column("folder", sa.String(255), primary_key=True),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("last_uid", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "imap_status",
        sa.Column("mailbox", sa.String(64), primary_key=True),
        sa.Column("connected", sa.Boolean, nullable=False),
        sa.Column("last_success", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.String(1000)),
        sa.Column("last_error_at", sa.DateTime(timezone=True)),
        sa.Column("ingested", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("imap_status")
    op.drop_table("imap_checkpoints")
