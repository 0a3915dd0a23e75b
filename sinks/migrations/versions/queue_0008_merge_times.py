"""The times merges and links happened, so events applied out of order (they
travel on different partitions) end as if applied in order: a merged-away
contact's row keeps when it was merged (``merged_at``: an older unmerge applied
after a newer merge no longer brings the contact back to life), and an
identity when it was linked to its contact (``linked_at``: an older merge or
unmerge no longer takes it back).

Rows written before this revision have none (NULL: the time is unknown); events
then apply to them as they did before. A rebuild from the topics fills them.

Revision ID: queue_0008
Revises: queue_0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queue_0008"
down_revision = "queue_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: ALTER TABLE ... ADD COLUMN on both databases, no rebuild.
    op.add_column("queue_contacts", sa.Column("merged_at", sa.DateTime(timezone=True)))
    op.add_column("queue_identities", sa.Column("linked_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    # In place on both (SQLite 3.35 and later, which the sink needs for RETURNING).
    op.execute("ALTER TABLE queue_identities DROP COLUMN linked_at")
    op.execute("ALTER TABLE queue_contacts DROP COLUMN merged_at")
