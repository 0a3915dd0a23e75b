"""The identities a channel proved on a message besides its sender
(``verified_keys``): a web hook of the company's own that vouches for its user's
email and phone proves both, and the queue showed the one that was not the sender
as claimed ("anyone could have typed it"; attacker review, 2026-12-02).

Rows written before this revision have none (NULL); a rebuild from the topics
fills them.

Revision ID: queue_0009
Revises: queue_0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queue_0009"
down_revision = "queue_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: ALTER TABLE ... ADD COLUMN on both databases, no rebuild.
    op.add_column("queue_messages", sa.Column("verified_keys", sa.Text()))


def downgrade() -> None:
    op.execute("ALTER TABLE queue_messages DROP COLUMN verified_keys")
