"""Full-text search over the queue's messages, one interface on two databases.

The document of a message is its sender's display name, its subject and its text
(the new part of a reply when known), cut at 20,000 characters. Words match as
prefixes and all must match (``refund iban`` finds "Refunds to IBAN ...").

- SQLite: an FTS5 table ``queue_search`` (message id, document) that the writer
  fills as messages arrive (migration queue_0007 creates it and indexes what is there).
- PostgreSQL: no second copy: a GIN index on ``to_tsvector('simple', document)``
  over ``queue_messages``, queried with the very same expression.

Both use no stemming ('simple', unicode61), so the two answer alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

from sqlalchemy import Connection, Text, Uuid, column, delete, insert, table, text

from normalize.identity import IdentityError, canonical_email, canonical_phone, parse_identity_key

MAX_CHARS = 20_000
# The same expression as the index of migration queue_0007 (the planner needs it verbatim).
PG_DOCUMENT = (
    "to_tsvector('simple', coalesce(sender_name, '') || ' ' || coalesce(subject, '') "
    "|| ' ' || left(coalesce(text_new, text, ''), 20000))"
)
_WORD = re.compile(r"\w+", re.UNICODE)
_fts = table("queue_search", column("message_id", Uuid), column("document", Text))
_INDEX = insert(_fts)  # built once: a row per message written


def words(query: str) -> list[str]:
    """The searchable words of a query (punctuation and operators dropped), at most 8."""
    return [w.lower() for w in _WORD.findall(query)][:8]


class MessageSearch(Protocol):
    """Which messages match every word (as a prefix); newest first."""

    def index_many(self, c: Connection, documents: Sequence[tuple[UUID, str]]) -> None: ...

    def find(self, c: Connection, query: str, limit: int) -> list[UUID]: ...

    def reset(self, c: Connection) -> None: ...


def document(sender_name: str | None, subject: str | None, body: str | None) -> str:
    return f"{sender_name or ''} {subject or ''} {(body or '')[:MAX_CHARS]}"


class SqliteSearch:
    """FTS5, filled by the writer."""

    def index_many(self, c: Connection, documents: Sequence[tuple[UUID, str]]) -> None:
        if documents:
            c.execute(_INDEX, [{"message_id": i, "document": d} for i, d in documents])

    def find(self, c: Connection, query: str, limit: int) -> list[UUID]:
        found = words(query)
        if not found:
            return []
        # Each word quoted (no FTS5 operator survives), as a prefix.
        match = " ".join(f'"{w}"*' for w in found)
        rows = c.execute(
            text(
                "SELECT m.id FROM queue_search s JOIN queue_messages m ON m.id = s.message_id "
                "WHERE queue_search MATCH :match ORDER BY m.received_at DESC LIMIT :limit"
            ).columns(column("id", Uuid)),
            {"match": match, "limit": limit},
        )
        return [UUID(str(r)) for r in rows.scalars()]

    def reset(self, c: Connection) -> None:
        c.execute(delete(_fts))


class PostgresSearch:
    """A GIN expression index over queue_messages; nothing to write."""

    def index_many(self, c: Connection, documents: Sequence[tuple[UUID, str]]) -> None:
        pass

    def find(self, c: Connection, query: str, limit: int) -> list[UUID]:
        found = words(query)
        if not found:
            return []
        # Only word characters reach to_tsquery, each as a prefix, all required.
        tsquery = " & ".join(f"{w}:*" for w in found)
        rows = c.execute(
            text(
                f"SELECT id FROM queue_messages WHERE {PG_DOCUMENT} @@ "  # noqa: S608 - a constant
                "to_tsquery('simple', :q) ORDER BY received_at DESC LIMIT :limit"
            ).columns(column("id", Uuid)),
            {"q": tsquery, "limit": limit},
        )
        return [UUID(str(r)) for r in rows.scalars()]

    def reset(self, c: Connection) -> None:
        pass


def for_dialect(name: str) -> MessageSearch:
    return PostgresSearch() if name == "postgresql" else SqliteSearch()


_PHONE_LIKE = re.compile(r"^[\s+()\-.\d]{7,}$")


def identity_keys(query: str, default_region: str | None = None) -> list[str]:
    """What an agent typed, as the identity keys ingest would have made of it:
    ``CAROL@Example.org`` -> ``email:carol@example.org``; ``(415) 555-0123`` and
    ``+14155550123`` -> ``phone:+14155550123``; ``email:...``/``phone:...`` keys
    canonicalized too (a ``+`` sent unencoded in a URL arrives as a space)."""
    query = query.strip()
    try:
        kind = query.split(":", 1)[0].lower()
        if kind in ("email", "phone", "external") and ":" in query:
            value = query.split(":", 1)[1].strip()
            if kind == "phone" and value[:1].isdigit() and len(value) > 10:
                value = "+" + value  # '+1415...' whose '+' became a space
            return [parse_identity_key(f"{kind}:{value}", default_region).key]
        if "@" in query:
            return [f"email:{canonical_email(query)}"]
        if _PHONE_LIKE.match(query) and sum(ch.isdigit() for ch in query) >= 7:
            return [f"phone:{canonical_phone(query, default_region)}"]
    except IdentityError:
        return []
    return []
