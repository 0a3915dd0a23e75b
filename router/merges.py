"""An agent's merge, and undoing a merge: what goes back to the restored contact,
and what it says on the contacts topic."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa

from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    MessageMove,
)
from router.apply import contact_event, merge_contacts
from router.decide import (
    derived_id,
)
from router.directory import Conflict, aware, lock_contacts, utcnow
from router.outbox import make_event, new_event_uuid, record
from router.tables import contacts, conversations, identities, merge_items, merges, messages
from router.writes import lock_merged_into
from switchboard.events import (
    Event,
    contact_event_type,
)

log = logging.getLogger(__name__)


class UnknownContact(LookupError):
    pass


class MergeRefused(ValueError):
    """An agent's merge or unmerge that cannot be done as asked (the message says why)."""


def retrying(action: Callable[[], Event]) -> Event:
    """An agent's action (one transaction), done again when it was rolled back for a
    reason that says nothing about the action: a contact changed under it
    (:class:`Conflict`), or PostgreSQL rolled it back (a deadlock or a serialization
    failure, SQLSTATE class 40); 5 attempts, a short pause growing between them."""
    for attempt in range(1, 6):
        try:
            return action()
        except Exception as exc:
            if attempt == 5 or not _worth_retrying(exc):
                raise
            log.info(
                "an agent's action met a router's or another agent's; retrying",
                extra={"error": repr(exc)[:200], "attempt": attempt},
            )
        time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _worth_retrying(exc: Exception) -> bool:
    if isinstance(exc, Conflict):
        return True
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, sa.DBAPIError) and isinstance(state, str) and state.startswith("40")


def current(c: Connection, contact_id: UUID) -> UUID:
    row = c.execute(
        select(contacts.c.id, contacts.c.merged_into).where(contacts.c.id == contact_id)
    ).first()
    if row is None:
        raise UnknownContact(str(contact_id))
    return UUID(str(row.merged_into or row.id))


def merge_by_agent(engine: Engine, contact_id: UUID, other_id: UUID, by: str | None) -> Event:
    """See :meth:`router.store.RouterStore.merge`."""
    with engine.begin() as c:
        survivor = current(c, contact_id)
        other = current(c, other_id)
        if survivor == other:
            raise MergeRefused(f"{other_id} and {contact_id} are already one contact")
        lock_contacts(c, {survivor, other}, current={survivor, other})
        # Stamped once the contacts are ours, so that it orders after every event a
        # router made about them while holding them.
        now = utcnow()
        owner = c.execute(select(contacts.c.owner).where(contacts.c.id == survivor)).scalar_one()
        event_id = new_event_uuid()
        moved = merge_contacts(c, survivor, other, now, event_id=event_id, by=by)
        event = contact_event(
            ContactEventKind.MERGED,
            survivor,
            event_id,
            now,
            identities=tuple(moved),
            merged_contact_ids=(other,),
            owner=owner,
            by=by,
        )
        record(c, None, [event], pending=True)
    log.info(
        "contacts merged by an agent",
        extra={"survivor": str(survivor), "merged": [str(other)], "by": by},
    )
    return event


def unmerge(engine: Engine, contact_id: UUID, merged_id: UUID, by: str | None) -> Event:
    """Give ``merged_id`` back what it had when it was merged (its identities,
    the contacts merged into it before, its conversations with their messages),
    plus what arrived since through its identities: the messages, the
    identities those messages linked, and conversations they started. A message
    that sits in a conversation of the other contact moves to the latest
    conversation of the contact it belongs to."""
    with engine.begin() as c:
        row = c.execute(
            select(contacts.c.merged_into, contacts.c.owner).where(contacts.c.id == merged_id)
        ).first()
        if row is None:
            raise UnknownContact(str(merged_id))
        if row.merged_into is None:
            raise MergeRefused(f"contact {merged_id} is not merged into another")
        survivor = UUID(str(row.merged_into))
        if current(c, contact_id) != survivor:
            raise MergeRefused(f"contact {merged_id} is not merged into {contact_id}")
        merge_row = c.execute(
            select(merges)
            .where(merges.c.merged_id == merged_id, merges.c.undone_at.is_(None))
            .order_by(merges.c.merged_at.desc())
            .limit(1)
        ).first()
        if merge_row is None:
            raise MergeRefused(f"no record of the merge of {merged_id}: it cannot be undone")
        lock_contacts(c, {survivor, merged_id}, current={survivor})
        if current(c, merged_id) != survivor:
            raise Conflict("the merge changed meanwhile")
        # The contacts that follow merged_id back are written below: locked now,
        # without waiting (router.writes.lock_merged_into).
        lock_merged_into(c, [survivor])
        now = utcnow()  # once the contacts are ours (see merge_by_agent)
        items: dict[str, set[str]] = defaultdict(set)
        for kind, ref in c.execute(
            select(merge_items.c.kind, merge_items.c.ref).where(
                merge_items.c.merge_id == merge_row.id
            )
        ):
            items[kind].add(ref)
        since = aware(merge_row.merged_at)
        keys, theirs = _what_is_theirs(c, survivor, set(items["identity"]), since)
        c.execute(
            update(identities)
            .where(identities.c.key.in_(sorted(keys)), identities.c.contact_id == survivor)
            .values(contact_id=merged_id)
        )
        # The contacts merged into it before that still point at the survivor follow
        # it back; one unmerged since (or merged elsewhere) stays where it is, and
        # the event names only those that follow (a review found it naming all, so
        # every read model merged a freed contact again).
        recorded = sorted(UUID(r) for r in items["contact"])
        earlier = (
            sorted(
                UUID(str(i))
                for i in c.execute(
                    select(contacts.c.id).where(
                        contacts.c.id.in_(recorded), contacts.c.merged_into == survivor
                    )
                ).scalars()
            )
            if recorded
            else []
        )
        if earlier:
            c.execute(
                update(contacts)
                .where(contacts.c.id.in_(earlier))
                .values(merged_into=merged_id, updated_at=now)
            )
        c.execute(
            update(contacts)
            .where(contacts.c.id == merged_id)
            .values(merged_into=None, merged_at=None, updated_at=now)
        )
        event_id = new_event_uuid()
        moves = _split_messages(
            c,
            survivor,
            merged_id,
            conversations_back={UUID(r) for r in items["conversation"]},
            messages_back={UUID(r) for r in items["message"]} | theirs,
            since=since,
            event_id=event_id,
        )
        c.execute(
            update(merges).where(merges.c.id == merge_row.id).values(undone_at=now, undone_by=by)
        )
        restored = sorted(
            c.execute(
                select(identities.c.key).where(identities.c.contact_id == merged_id)
            ).scalars()
        )
        back = sorted(
            UUID(str(i))
            for i in c.execute(
                select(conversations.c.id).where(conversations.c.contact_id == merged_id)
            ).scalars()
        )
        data = ContactEvent(
            event_id=event_id,
            kind=ContactEventKind.UNMERGED,
            contact_id=merged_id,
            other_contact_id=survivor,
            occurred_at=now,
            owner=row.owner,
            identities=tuple(restored),
            merged_contact_ids=tuple(earlier),
            conversation_ids=tuple(back),
            moved_messages=tuple(moves),
            by=by,
        )
        # Keyed like the merge it undoes, so every reader applies it after it.
        event = make_event(
            contact_event_type(ContactEventKind.UNMERGED), str(survivor), data, event_id
        )
        record(c, None, [event], pending=True)
    log.info(
        "contact unmerged",
        extra={
            "contact_id": str(merged_id),
            "from": str(survivor),
            "moved_messages": len(moves),
            "by": by,
        },
    )
    return event


def _what_is_theirs(
    c: Connection, survivor: UUID, keys: set[str], since: datetime
) -> tuple[set[str], set[UUID]]:
    """What of ``survivor`` belongs to the contact whose identities at its merge
    (``since``) were ``keys``: the messages routed since that carried one of its
    identities and none the survivor had before the merge, the identities those
    messages linked, and so on (a message through an identity linked that way is
    theirs too). A message that carried identities of both stays: it says the two
    are one person, and an agent can merge them again."""
    links = c.execute(
        select(identities.c.key, identities.c.message_id, identities.c.linked_at).where(
            identities.c.contact_id == survivor
        )
    ).all()
    before = {r.key for r in links if r.key not in keys and aware(r.linked_at) < since}
    linked_by: dict[UUID, set[str]] = defaultdict(set)
    for r in links:
        if r.message_id is not None and aware(r.linked_at) >= since:
            linked_by[UUID(str(r.message_id))].add(r.key)
    carried = {
        UUID(str(r.id)): frozenset((r.identity_keys or "").split("\n")) - {""}
        for r in c.execute(
            select(messages.c.id, messages.c.identity_keys).where(
                messages.c.contact_id == survivor, messages.c.routed_at >= since
            )
        )
    }
    keys, theirs = set(keys), set[UUID]()
    grew = True
    while grew:
        grew = False
        for message_id, carried_keys in carried.items():
            if message_id in theirs or not carried_keys & keys or carried_keys & before:
                continue
            theirs.add(message_id)
            keys |= linked_by.get(message_id, set())
            grew = True
    return keys, theirs


def _split_messages(
    c: Connection,
    survivor: UUID,
    restored: UUID,
    *,
    conversations_back: set[UUID],
    messages_back: set[UUID],
    since: datetime,
    event_id: UUID,
) -> list[MessageMove]:
    """Give ``restored`` its conversations and messages back (see
    :func:`unmerge`); returns the messages that changed conversation."""
    found = c.execute(
        select(
            messages.c.id,
            messages.c.conversation_id,
            messages.c.received_at,
            messages.c.routed_at,
        ).where(
            messages.c.contact_id == survivor,
            or_(
                messages.c.conversation_id.in_(sorted(conversations_back)),
                messages.c.routed_at >= since,
            ),
        )
    ).all()

    def belongs(r: Any) -> UUID:  # noqa: ANN401 - a Row
        if UUID(str(r.id)) in messages_back:
            return restored
        return survivor

    by_conversation: dict[UUID, list[Any]] = defaultdict(list)
    for r in found:
        by_conversation[UUID(str(r.conversation_id))].append(r)
    # A conversation goes back when it was the restored contact's; one started
    # during the merge belongs to whoever wrote its first message; any other
    # stays (it was the survivor's before the merge).
    started_before = {
        UUID(str(conv))
        for conv in c.execute(
            select(messages.c.conversation_id)
            .where(
                messages.c.conversation_id.in_(sorted(by_conversation)),
                messages.c.routed_at < since,
            )
            .distinct()
        ).scalars()
    }
    home: dict[UUID, UUID] = {}
    for conv, rows in by_conversation.items():
        if conv in conversations_back:
            home[conv] = restored
        elif conv in started_before:
            home[conv] = survivor
        else:
            first = min(rows, key=lambda r: (aware(r.received_at), str(r.id)))
            home[conv] = belongs(first)
    mine = sorted(conversations_back | {conv for conv, who in home.items() if who == restored})
    if mine:
        c.execute(
            update(conversations)
            .where(conversations.c.id.in_(mine))
            .values(contact_id=restored, owner=_owner_of(restored))
        )
        c.execute(
            update(messages).where(messages.c.conversation_id.in_(mine)).values(contact_id=restored)
        )
    misplaced = [
        (r, who) for r in found if (who := belongs(r)) != home[UUID(str(r.conversation_id))]
    ]
    if not misplaced:
        return []
    targets: dict[UUID, UUID] = {}
    for who in sorted({who for _, who in misplaced}):
        latest = _latest_conversation(c, who)
        if latest is None:  # pragma: no cover - every contact was created with a conversation
            first = min(aware(r.received_at) for r, w in misplaced if w == who)
            latest = derived_id(event_id, f"conversation:{who}")
            c.execute(
                insert(conversations).values(
                    id=latest,
                    contact_id=who,
                    started_at=first,
                    last_message_at=first,
                    message_count=0,
                    owner=_owner_of(who),
                )
            )
        targets[who] = latest
    misplaced.sort(key=lambda pair: (aware(pair[0].received_at), str(pair[0].id)))
    moves = [
        MessageMove(message_id=UUID(str(r.id)), conversation_id=targets[who])
        for r, who in misplaced
    ]
    c.execute(
        update(messages)
        .where(messages.c.id == bindparam("moved_id"))
        .values(conversation_id=bindparam("to_conversation"), contact_id=bindparam("to_contact")),
        [
            {"moved_id": UUID(str(r.id)), "to_conversation": targets[who], "to_contact": who}
            for r, who in misplaced
        ],
    )
    touched = {UUID(str(r.conversation_id)) for r, _ in misplaced} | set(targets.values())
    for conv in sorted(touched):
        count, last = c.execute(
            select(func.count(), func.max(messages.c.received_at)).where(
                messages.c.conversation_id == conv
            )
        ).one()
        values: dict[str, Any] = {"message_count": count}
        if last is not None:
            values["last_message_at"] = last
        c.execute(update(conversations).where(conversations.c.id == conv).values(**values))
    return moves


def _owner_of(contact_id: UUID) -> Any:  # noqa: ANN401 - a scalar subquery
    """The contact's owner, for the conversations it gets (they carry it)."""
    return select(contacts.c.owner).where(contacts.c.id == contact_id).scalar_subquery()


def _latest_conversation(c: Connection, contact_id: UUID) -> UUID | None:
    found = c.execute(
        select(conversations.c.id)
        .where(conversations.c.contact_id == contact_id)
        .order_by(conversations.c.last_message_at.desc())
        .limit(1)
    ).scalar()
    return None if found is None else UUID(str(found))
