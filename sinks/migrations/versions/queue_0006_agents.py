"""Agents as people (issue 18): password hashes, personal API tokens (their
digests), and server-side sign-in sessions, beside the queue read model.

Revision ID: queue_0006 (0008 on the h-queue branch before the chains split)
Revises: queue_0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queue_0006"
down_revision = "queue_0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("password_hash", sa.String(256)),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "agent_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS),
    )
    op.create_index("ix_agent_tokens_agent", "agent_tokens", ["agent"])
    op.create_table(
        "agent_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
    )
    op.create_index("ix_agent_sessions_agent", "agent_sessions", ["agent"])


def downgrade() -> None:
    op.drop_table("agent_sessions")
    op.drop_table("agent_tokens")
    op.drop_table("agents")
