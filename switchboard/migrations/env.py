"""Alembic environment of every stage's chain: run programmatically by switchboard.db.migrate."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `switchboard db upgrade`, not the alembic CLI")

# render_as_batch: SQLite can only alter tables by copying them; Alembic's batch mode
# does that, and is a no-op on PostgreSQL. version_table: every stage's chain keeps
# its revision in a table of its own (switchboard.db.Chain).
context.configure(
    connection=connection,
    target_metadata=None,
    render_as_batch=True,
    version_table=context.config.attributes.get("version_table", "alembic_version"),
)
with context.begin_transaction():
    context.run_migrations()
