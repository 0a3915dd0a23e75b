"""Answering the queue API's questions from the read model, per conversation: an
owner's conversations (keyset-paginated in SQL), a conversation, a contact,
attachments, suggestions. Customer-level reads build on it in
:mod:`sinks.customers`."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Uuid,
    func,
    literal,
    select,
    tuple_,
)

from sinks import suggestions
from sinks.queue_tables import (
    _TS,
    TABLES,
    _aware,
    applied,
    q_attachments,
    q_contacts,
    q_conversations,
    q_identities,
    q_messages,
    survivor,
)

#: Messages a card or a conversation shows at once: a stranger can send any number
#: of messages as (or to the contact of) a customer, and a card of 160 large mails
#: was 174 MB of HTML and 600 MB of the server's memory to render (review of
#: 2026-12-01). Older ones are a page further (``older``).
MESSAGES_PAGE = 30


class NotFound(LookupError):
    pass


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


class QueueReader:
    """Reads the read model for the API and the page."""

    def __init__(self, engine: Engine, teams: dict[str, Sequence[str]] | None = None) -> None:
        self.engine = engine
        self.teams = {name: tuple(agents) for name, agents in (teams or {}).items()}

    def owners(self) -> list[str]:
        with self.engine.connect() as c:
            found = set(c.execute(select(q_conversations.c.owner).distinct()).scalars())
        for team, agents in self.teams.items():
            found |= {team, *agents}
        return sorted(found)

    def queue(
        self, owner: str, *, status: str = "open", limit: int = 50, cursor: str | None = None
    ) -> Page:
        """Conversations of an owner (an agent, or a team: itself and its agents),
        oldest waiting first, then oldest activity; keyset-paginated in SQL (the
        index on owner, status and oldest_unanswered_at serves it)."""
        who = [owner, *self.teams.get(owner, ())]
        # Conversations nobody waits for sort after every waiting one.
        waiting = func.coalesce(q_conversations.c.oldest_unanswered_at, literal(_FAR, _TS))
        key = (waiting, q_conversations.c.last_message_at, q_conversations.c.id)
        query = select(q_conversations).where(
            q_conversations.c.owner.in_(who),
            q_conversations.c.message_count > 0,  # emptied by an unmerge: nothing to do
        )
        if status != "all":
            query = query.where(q_conversations.c.status == status)
        if cursor is not None:
            query = query.where(_after(key, cursor))
        with self.engine.connect() as c:
            rows = c.execute(query.order_by(*key).limit(limit + 1)).all()
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit and page else None
        return Page([_conversation_summary(r) for r in page], next_cursor)

    def conversation(
        self, conversation_id: UUID, *, limit: int = MESSAGES_PAGE, before: str | None = None
    ) -> dict[str, Any]:
        """A conversation with its newest ``limit`` messages (oldest first), before
        ``before`` (the ``older`` cursor of the page after it); ``older`` names the
        page before this one, None at the first message."""
        with self.engine.connect() as c:
            row = c.execute(
                select(q_conversations).where(q_conversations.c.id == conversation_id)
            ).first()
            if row is None:
                raise NotFound(str(conversation_id))
            found, older = message_page(
                c, q_messages.c.conversation_id == conversation_id, limit, before
            )
        return {
            **_conversation_summary(row),
            "messages": [_message(m) for m in found],
            "older": older,
        }

    def message(self, message_id: UUID) -> dict[str, Any]:
        """One message, whole (the card clips long texts), with its conversation and
        contact."""
        with self.engine.connect() as c:
            row = c.execute(select(q_messages).where(q_messages.c.id == message_id)).first()
        if row is None:
            raise NotFound(str(message_id))
        return {
            **_message(row),
            "conversation_id": str(row.conversation_id),
            "contact_id": str(row.contact_id),
        }

    def contact(self, contact_id: UUID) -> dict[str, Any]:
        """The contact's card as JSON. ``identities`` are the keys (as before);
        ``identity_details`` the same with kind, value and assurance, as the queue's
        items give them (the card's API had no assurance until 2026-12-02)."""
        with self.engine.connect() as c:
            live = survivor(c, contact_id)
            row = c.execute(select(q_contacts).where(q_contacts.c.id == live)).first()
            if row is None:
                raise NotFound(str(contact_id))
            keys = sorted(
                c.execute(
                    select(q_identities.c.key).where(q_identities.c.contact_id == live)
                ).scalars()
            )
            convs = c.execute(
                select(q_conversations)
                .where(q_conversations.c.contact_id == live)
                .order_by(q_conversations.c.last_message_at.desc())
            ).all()
            merged_ids = list(
                c.execute(select(q_contacts.c.id).where(q_contacts.c.merged_into == live))
                .scalars()
                .all()
            )
            suggested = suggestions.open_for(
                c, live, merged_ids, lambda contact: survivor(c, contact)
            )
            proven = proven_identities(c, [live])
        return {
            "id": str(live),
            "requested_id": str(contact_id),
            "merged": live != contact_id,
            "owner": row.owner,
            "identities": keys,
            "identity_details": [identity_item(k, (str(live), k) in proven) for k in keys],
            "conversations": [_conversation_summary(r) for r in convs],
            "merge_suggestions": suggested,
        }

    def contact_by_identity(self, key: str) -> dict[str, Any]:
        with self.engine.connect() as c:
            found = c.execute(
                select(q_identities.c.contact_id).where(q_identities.c.key == key)
            ).scalar()
        if found is None:
            raise NotFound(key)
        return self.contact(found)

    def referenced_blobs(self, among: Collection[str]) -> set[str]:
        """Which of these blobs a message of the read model still has as an attachment."""
        wanted = sorted(set(among))
        found: set[str] = set()
        with self.engine.connect() as c:
            for start in range(0, len(wanted), 1000):
                chunk = wanted[start : start + 1000]
                found.update(
                    c.execute(
                        select(q_attachments.c.sha256)
                        .where(q_attachments.c.sha256.in_(chunk))
                        .distinct()
                    ).scalars()
                )
        return found

    def attachment(self, sha256: str, message_id: UUID | None = None) -> dict[str, Any] | None:
        """The recorded attachment (filename, content type) with this blob, if any: as
        ``message_id`` carried it when given (the same bytes sent by two people carry
        two names: a stranger who sent them first must not name the customer's
        copy), else as the first message that carried it."""
        query = select(q_attachments.c.attachment).where(q_attachments.c.sha256 == sha256)
        if message_id is not None:
            query = query.where(q_attachments.c.message_id == message_id)
        with self.engine.connect() as c:
            found = c.execute(query.order_by(q_attachments.c.message_id).limit(1)).scalar()
        return dict(found) if found else None

    def suggestion(self, suggestion_id: UUID) -> tuple[UUID, UUID]:
        """(contact, other contact) of a merge suggestion; NotFound if unknown."""
        with self.engine.connect() as c:
            row = suggestions.find(c, suggestion_id)
        if row is None:
            raise NotFound(str(suggestion_id))
        return UUID(str(row.contact_id)), UUID(str(row.other_contact_id))

    def conversation_contact(self, conversation_id: UUID) -> UUID:
        with self.engine.connect() as c:
            found = c.execute(
                select(q_conversations.c.contact_id).where(q_conversations.c.id == conversation_id)
            ).scalar()
        if found is None:
            raise NotFound(str(conversation_id))
        return UUID(str(found))

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the read model (minus application times), for comparisons."""
        with self.engine.connect() as c:
            return {
                t.name: sorted(
                    (tuple(str(v) for v in r) for r in c.execute(select(t))),
                )
                for t in TABLES
                if t is not applied
            }


_FAR = datetime(9999, 1, 1, tzinfo=UTC)


def _encode_cursor(row: Any) -> str:  # noqa: ANN401 - a Row of queue_conversations
    return _cursor_of(
        _aware(row.oldest_unanswered_at) or _FAR,
        _aware(row.last_message_at) or _FAR,
        row.id,
    )


def message_page(
    c: Connection,
    where: ColumnElement[bool],
    limit: int,
    before: str | None,
) -> tuple[list[Any], str | None]:
    """The newest ``limit`` messages matching ``where`` before the cursor, oldest
    first, and the cursor of the page before them (None when there is none)."""
    key = (q_messages.c.received_at, q_messages.c.id)
    query = select(q_messages).where(where)
    if before is not None:
        (at,), message_id = _decode_key(before, 1)
        query = query.where(tuple_(*key) < tuple_(literal(at, _TS), literal(message_id, Uuid)))
    rows = c.execute(query.order_by(*(k.desc() for k in key)).limit(limit + 1)).all()
    page = rows[:limit]
    older = None
    if len(rows) > limit and page:
        last = page[-1]
        older = _encode_key((_aware(last.received_at) or _FAR,), last.id)
    return list(reversed(page)), older


def _encode_key(times: Sequence[datetime], row_id: object) -> str:
    """A keyset cursor: the row's sort times and its id, as base64url JSON."""
    key = [*(t.isoformat() for t in times), str(row_id)]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _decode_key(cursor: str, times: int) -> tuple[list[datetime], UUID]:
    """What :func:`_encode_key` made with ``times`` times, or BadCursor."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not (isinstance(value, list) and len(value) == times + 1):
            raise ValueError("not a key")
        found = [_aware(datetime.fromisoformat(v)) or _FAR for v in value[:times]]
        return found, UUID(value[times])
    except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise BadCursor("cursor is not one this API returned") from exc


def _cursor_of(waiting: datetime, last: datetime, row_id: object) -> str:
    return _encode_key((waiting, last), row_id)


def _after(key: tuple[Any, Any, Any], cursor: str) -> Any:  # noqa: ANN401 - SQL expression
    """Keyset pagination: the rows after the one a cursor of ours names, by
    (waiting since, last activity, id)."""
    w, last, after_id = _decode_cursor(cursor)
    return tuple_(*key) > tuple_(literal(w, _TS), literal(last, _TS), literal(after_id, Uuid))


def _decode_cursor(cursor: str) -> tuple[datetime, datetime, UUID]:
    (waiting, last), row_id = _decode_key(cursor, 2)
    return waiting, last, row_id


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value else None


def _conversation_summary(row: Any) -> dict[str, Any]:  # noqa: ANN401 - a Row
    return {
        "id": str(row.id),
        "contact_id": str(row.contact_id),
        "owner": row.owner,
        "status": row.status,
        "channels": list(row.channels),
        "oldest_unanswered_at": _iso(row.oldest_unanswered_at),
        "started_at": _iso(row.started_at),
        "last_message_at": _iso(row.last_message_at),
        "last_preview": row.last_preview,
        "message_count": row.message_count,
    }


def _message(row: Any) -> dict[str, Any]:  # noqa: ANN401 - a Row
    return {
        "id": str(row.id),
        "received_at": _iso(row.received_at),
        "channel": row.channel,
        "sender": row.sender,
        "sender_name": row.sender_name,
        "subject": row.subject,
        "text": row.text,
        "text_new": row.text_new,
        "html": row.html,
        "attachments": list(row.attachments),
        "flags": {"auto_reply": row.auto_reply, "bounce": row.bounce},
        "inboxes": list(row.inboxes),
        "sender_verified": bool(row.sender_verified),
        "sender_evidence": row.sender_evidence,
        "authentication": row.authentication,
        "mail_message_id": row.mail_message_id,
        "mail_references": row.mail_references.split() if row.mail_references else [],
    }


def identity_item(key: str, verified: bool) -> dict[str, Any]:
    """An identity as the API shows it: key, kind, value and assurance."""
    kind, _, value = key.partition(":")
    return {
        "key": key,
        "kind": kind,
        "value": value,
        "assurance": "verified" if verified else "claimed",
    }


def proven_identities(c: Connection, contact_ids: Sequence[UUID]) -> set[tuple[str, str]]:
    """(contact id, identity key) for every identity a channel proved on a message of
    these contacts: as the sender, or beside it (a vouching hook's phone, shown as
    claimed until 2026-12-02: attacker review)."""
    m = q_messages.c
    proven = {
        (str(contact), sender)
        for contact, sender in c.execute(
            select(m.contact_id, m.sender)
            .where(m.contact_id.in_(contact_ids), m.sender_verified.is_(True))
            .distinct()
        )
    }
    for contact, verified_keys in c.execute(
        select(m.contact_id, m.verified_keys)
        .where(m.contact_id.in_(contact_ids), m.verified_keys.is_not(None))
        .distinct()
    ):
        proven.update((str(contact), key) for key in verified_keys.split("\n"))
    return proven
