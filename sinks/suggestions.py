"""Merge suggestions in the queue read model: what the router did not merge on a
stranger's word, for an agent to confirm or dismiss.

Built only from ``merge.suggested`` and ``merge.dismissed`` on the contacts topic,
both keyed by the suggesting contact, so they arrive in order and a rebuild gives
the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Column, Connection, DateTime, Index, MetaData, String, Table, Uuid, select
from sqlalchemy import update as sql_update
from sqlalchemy.dialects import postgresql, sqlite

from normalize.schema import ContactEvent, ContactEventKind

_TS = DateTime(timezone=True)

metadata = MetaData()

suggestions = Table(
    "queue_merge_suggestions",
    metadata,
    Column("id", Uuid, primary_key=True),  # the merge.suggested event id
    Column("contact_id", Uuid, nullable=False),
    Column("other_contact_id", Uuid, nullable=False),
    Column("identity", String(400), nullable=False),
    Column("message_id", Uuid),
    Column("suggested_at", _TS, nullable=False),
    Column("dismissed_at", _TS),
    Column("dismissed_by", String(128)),
    Index("ix_queue_merge_suggestions_contact", "contact_id"),
    Index("ix_queue_merge_suggestions_other", "other_contact_id"),
)


def apply(c: Connection, e: ContactEvent) -> None:
    """Record a suggestion, or its dismissal."""
    if e.kind == ContactEventKind.MERGE_SUGGESTED and e.other_contact_id and e.identities:
        dialect = postgresql if c.dialect.name == "postgresql" else sqlite
        row = {
            "id": e.event_id,
            "contact_id": e.contact_id,
            "other_contact_id": e.other_contact_id,
            "identity": e.identities[0],
            "message_id": e.message_id,
            "suggested_at": e.occurred_at,
        }
        c.execute(dialect.insert(suggestions).values(**row).on_conflict_do_nothing())
    elif e.kind == ContactEventKind.MERGE_DISMISSED and e.suggestion_id:
        c.execute(
            sql_update(suggestions)
            .where(suggestions.c.id == e.suggestion_id, suggestions.c.dismissed_at.is_(None))
            .values(dismissed_at=e.occurred_at, dismissed_by=e.by)
        )


def open_for(
    c: Connection, contact_id: UUID, merged_ids: list[UUID], survivor: Callable[[UUID], UUID]
) -> list[dict[str, Any]]:
    """Undismissed suggestions touching the contact (or a contact merged into it),
    except those whose two contacts have become one meanwhile."""
    ids = [contact_id, *merged_ids]
    rows = c.execute(
        select(suggestions)
        .where(
            (suggestions.c.contact_id.in_(ids) | suggestions.c.other_contact_id.in_(ids)),
            suggestions.c.dismissed_at.is_(None),
        )
        .order_by(suggestions.c.suggested_at, suggestions.c.id)
    ).all()
    found = []
    for row in rows:
        # The claimant is the contact that got the message naming the identity; the
        # holder, the contact the identity already belonged to. On each side the card
        # said "contact <other> also wrote as <identity>, unverified": on the
        # claimant's card that put the doubt on the holder, and its button merged the
        # holder (a verified customer) into the claimant (a stranger's form post),
        # the claimant surviving with the customer's history (review, 2026-12-01).
        claimant, holder = survivor(row.contact_id), survivor(row.other_contact_id)
        if claimant == holder:
            continue
        found.append(
            {
                "id": str(row.id),
                "contact_id": str(contact_id),
                "other_contact_id": str(holder if claimant == contact_id else claimant),
                "claimant_contact_id": str(claimant),
                "holder_contact_id": str(holder),
                "identity": row.identity,
                "message_id": str(row.message_id) if row.message_id else None,
                "suggested_at": _iso(row.suggested_at),
            }
        )
    return found


def find(c: Connection, suggestion_id: UUID) -> Any:  # noqa: ANN401 - a Row or None
    return c.execute(select(suggestions).where(suggestions.c.id == suggestion_id)).first()


def _iso(value: datetime) -> str:
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()
