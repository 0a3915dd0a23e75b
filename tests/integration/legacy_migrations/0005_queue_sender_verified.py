"""Queue messages say whether their sender was verified, and how (schema revision 2).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue_messages") as batch:
        # Messages routed before revision 2 read as unverified, which they were.
        batch.add_column(
            sa.Column("sender_verified", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("sender_evidence", sa.String(200)))
        batch.add_column(sa.Column("authentication", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("queue_messages") as batch:
        batch.drop_column("authentication")
        batch.drop_column("sender_evidence")
        batch.drop_column("sender_verified")
