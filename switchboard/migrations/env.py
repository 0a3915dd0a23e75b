"""Alembic environment: always run programmatically by switchboard.db.upgrade."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `switchboard db upgrade`, not the alembic CLI")

# render_as_batch: SQLite can only alter tables by copying them; Alembic's batch mode
# does that, and is a no-op on PostgreSQL.
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
