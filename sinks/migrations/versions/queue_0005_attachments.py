"""The queue read model's attachments in a table of their own: the attachment
download and blob retention look a blob up by its digest instead of scanning
every message's JSON. Existing messages are copied in.

Revision ID: queue_0005 (was 0007 of the single chain)
Revises: queue_0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "queue_0005"
down_revision = "queue_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queue_attachments",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("message_id", sa.Uuid, primary_key=True),
        sa.Column("attachment", sa.JSON, nullable=False),
    )
    table = sa.table(
        "queue_attachments",
        sa.column("sha256", sa.String),
        sa.column("message_id", sa.Uuid),
        sa.column("attachment", sa.JSON),
    )
    bind = op.get_bind()
    messages = sa.table(
        "queue_messages", sa.column("id", sa.Uuid), sa.column("attachments", sa.JSON)
    )
    rows: list[dict[str, Any]] = []
    for message_id, attachments in bind.execute(sa.select(messages.c.id, messages.c.attachments)):
        found = json.loads(attachments) if isinstance(attachments, str) else attachments
        for a in found or ():
            sha256 = (a.get("blob") or {}).get("sha256")
            if isinstance(sha256, str) and len(sha256) == 64:
                rows.append({"sha256": sha256, "message_id": message_id, "attachment": a})
    unique = {(r["sha256"], str(r["message_id"])): r for r in rows}
    if unique:
        op.bulk_insert(table, list(unique.values()))


def downgrade() -> None:
    op.drop_table("queue_attachments")
