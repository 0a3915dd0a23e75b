"""The queue lists customers (issue 18): each contact's work kept on its row, with
the index that serves an owner's queue as one keyset range; and full-text search
over messages (SQLite: an FTS5 table the writer fills; PostgreSQL: a GIN index on
the same document expression the search uses).

Revision ID: queue_0007 (0009 on the h-queue branch before the chains split)
Revises: queue_0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queue_0007"
down_revision = "queue_0006"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_FAR = "9999-01-01 00:00:00+00:00"
# Kept identical to sinks.search.PG_DOCUMENT: the planner uses the index only for
# the very same expression.
_PG_DOCUMENT = (
    "to_tsvector('simple', coalesce(sender_name, '') || ' ' || coalesce(subject, '') "
    "|| ' ' || left(coalesce(text_new, text, ''), 20000))"
)


def upgrade() -> None:
    with op.batch_alter_table("queue_contacts") as batch:
        batch.add_column(sa.Column("work", sa.String(8)))
        batch.add_column(sa.Column("open_count", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("waiting_since", _TS))
        batch.add_column(sa.Column("wait_key", _TS, nullable=False, server_default=_FAR))
        batch.add_column(sa.Column("last_activity", _TS))
    with op.batch_alter_table("queue_messages") as batch:
        batch.add_column(sa.Column("mail_message_id", sa.String(998)))
        batch.add_column(sa.Column("mail_references", sa.Text))
    op.create_index(
        "ix_queue_contacts_work",
        "queue_contacts",
        ["owner", "work", "wait_key", "last_activity", "id"],
    )
    # Existing contacts: their work from their conversations.
    op.execute(
        """
        UPDATE queue_contacts SET
          open_count = (SELECT count(*) FROM queue_conversations v
                        WHERE v.contact_id = queue_contacts.id AND v.status = 'open'),
          waiting_since = (SELECT min(v.oldest_unanswered_at) FROM queue_conversations v
                           WHERE v.contact_id = queue_contacts.id AND v.status = 'open'),
          last_activity = (SELECT max(v.last_message_at) FROM queue_conversations v
                           WHERE v.contact_id = queue_contacts.id),
          work = CASE
            WHEN EXISTS (SELECT 1 FROM queue_conversations v
                         WHERE v.contact_id = queue_contacts.id AND v.status = 'open') THEN 'open'
            WHEN EXISTS (SELECT 1 FROM queue_conversations v
                         WHERE v.contact_id = queue_contacts.id AND v.status = 'waiting')
              THEN 'waiting'
            WHEN EXISTS (SELECT 1 FROM queue_conversations v
                         WHERE v.contact_id = queue_contacts.id) THEN 'closed'
          END
        """
    )
    op.execute("UPDATE queue_contacts SET wait_key = waiting_since WHERE waiting_since IS NOT NULL")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE INDEX ix_queue_messages_search ON queue_messages USING gin ({_PG_DOCUMENT})"
        )
    else:
        op.execute(
            "CREATE VIRTUAL TABLE queue_search USING fts5("
            "message_id UNINDEXED, document, tokenize = 'unicode61 remove_diacritics 2')"
        )
        op.execute(
            "INSERT INTO queue_search (message_id, document) SELECT id, "
            "coalesce(sender_name, '') || ' ' || coalesce(subject, '') || ' ' || "
            "substr(coalesce(text_new, text, ''), 1, 20000) FROM queue_messages"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_queue_messages_search")
    else:
        op.execute("DROP TABLE queue_search")
    op.drop_index("ix_queue_contacts_work", "queue_contacts")
    with op.batch_alter_table("queue_messages") as batch:
        batch.drop_column("mail_references")
        batch.drop_column("mail_message_id")
    with op.batch_alter_table("queue_contacts") as batch:
        for column in ("last_activity", "wait_key", "waiting_since", "open_count", "work"):
            batch.drop_column(column)
