"""Applying events to the queue read model: one handler per event type,
registered in :data:`QueueWriter.handlers`, each in the transaction that marks
the event applied. Events may arrive in any order across partitions; each
handler keeps the rows a function of the events, not of their order."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    Uuid,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from normalize.schema import (
    Assurance,
    ContactEvent,
    ContactEventKind,
    ConversationStatus,
    InboundMessage,
    MessageDuplicate,
    MessageRouted,
)
from sinks import search, suggestions
from sinks.queue_tables import (
    _TS,
    FAR,
    PREVIEW,
    TABLES,
    _aware,
    _insert_ignoring,
    _now,
    _upsert_ignore,
    applied,
    q_attachments,
    q_contacts,
    q_conversations,
    q_identities,
    q_messages,
    q_unmerged_conversations,
    q_unmerged_messages,
    q_unmerges,
    survivor,
)
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    contact_event_type,
    read_data,
)

log = logging.getLogger(__name__)

# A handler's result is ignored, except _routed's (the contacts it touched).
Handler = Callable[["QueueWriter", Connection, Any], object]

# The statements every event runs, built once with bound parameters and reused:
# building a statement and its cache key per event took more of the sink's time
# than the database did (bench/queue_sink.py). Rarer ones (merges, unmerges,
# status changes) are still built where they run.
_contact, _conversation = q_contacts.c, q_conversations.c
_OWNER_FACT = select(_contact.owner, _contact.owner_at).where(_contact.id == bindparam("id"))
_OWNER = select(_contact.owner).where(_contact.id == bindparam("id"))
_SET_OWNER = (
    update(q_contacts)
    .where(_contact.id == bindparam("b_id"))
    .values(owner=bindparam("b_owner"), owner_at=bindparam("b_at"))
)
_CONVERSATIONS_OWNER = (
    update(q_conversations)
    .where(_conversation.contact_id == bindparam("b_id"))
    .values(owner=bindparam("b_owner"))
)
_OWNER_AFTER_UNMERGE = (
    update(q_contacts)
    .where(
        _contact.id == bindparam("b_id"),
        _contact.merged_into.is_not(None),
        _contact.owner_at < bindparam("b_at"),
    )
    .values(owner=bindparam("b_owner"), owner_at=bindparam("b_at"))
)
_CREATED_AT = (
    update(q_contacts).where(_contact.id == bindparam("b_id")).values(created_at=bindparam("b_at"))
)
# Where a routed message lands, in one round trip: the conversation an unmerge moved
# it to (if any), the contact that conversation went back to (if any), and what the
# event's contact was merged into (if it was).
_moved = (
    select(q_unmerged_messages.c.conversation_id)
    .where(q_unmerged_messages.c.message_id == bindparam("message_id"))
    .scalar_subquery()
)
_landing = func.coalesce(_moved, bindparam("conversation_id", type_=Uuid))
# The conversation the message lands in, as it is before the event: the columns the
# event's update reads (its owner is not among them; the event's owner facts, applied
# before that update, change only the owner).
_LANDING_COLUMNS = (
    "id",
    "contact_id",
    "channels",
    "message_count",
    "last_message_at",
    "started_at",
    "oldest_unanswered_at",
)
_WHERE_ROUTED = select(
    _moved.label("moved"),
    select(q_unmerged_conversations.c.contact_id)
    .where(q_unmerged_conversations.c.conversation_id == _landing)
    .scalar_subquery()
    .label("went_back"),
    select(_contact.merged_into)
    .where(_contact.id == bindparam("contact_id"))
    .scalar_subquery()
    .label("merged"),
    # The event contact's owner fact before the event (NULL: no row yet).
    select(_contact.owner)
    .where(_contact.id == bindparam("contact_id"))
    .scalar_subquery()
    .label("owner"),
    select(_contact.owner_at)
    .where(_contact.id == bindparam("contact_id"))
    .scalar_subquery()
    .label("owner_at"),
    *(
        select(_conversation[name])
        .where(_conversation.id == _landing)
        .scalar_subquery()
        .label(f"landing_{name}")
        for name in _LANDING_COLUMNS
    ),
    # Messages an unmerge moved into the conversation before this event created it.
    exists().where(q_messages.c.conversation_id == _landing).label("landing_held"),
    # The contacts its conversation and the message itself had before it (if any).
    select(_conversation.contact_id)
    .where(_conversation.id == bindparam("conversation_id", type_=Uuid))
    .scalar_subquery()
    .label("conversation_contact"),
    select(q_messages.c.contact_id)
    .where(q_messages.c.id == bindparam("message_id"))
    .scalar_subquery()
    .label("message_contact"),
)
# An owner fact that confirms the owner the contact has: only its time moves (its
# conversations have that owner already).
_SET_OWNER_AT = (
    update(q_contacts).where(_contact.id == bindparam("b_id")).values(owner_at=bindparam("b_at"))
)
_NEW_CONVERSATION = insert(q_conversations)
_ATTACHMENTS = insert(q_attachments)
_INBOXES = select(q_messages.c.inboxes).where(q_messages.c.id == bindparam("id"))
_SET_INBOXES = (
    update(q_messages).where(q_messages.c.id == bindparam("b_id")).values(inboxes=bindparam("b_in"))
)
_CONVERSATION_UPDATES: dict[tuple[str, ...], Any] = {}
_NO_FACT = datetime(1970, 1, 1, tzinfo=UTC)


def _uuid(value: object) -> UUID | None:
    return None if value is None else UUID(str(value))


def _update_conversation(c: Connection, conversation_id: UUID, values: dict[str, Any]) -> None:
    """``values`` into one conversation, by a statement kept per set of columns."""
    names = tuple(sorted(values))
    statement = _CONVERSATION_UPDATES.get(names)
    if statement is None:
        statement = (
            update(q_conversations)
            .where(_conversation.id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in names})
        )
        _CONVERSATION_UPDATES[names] = statement
    c.execute(statement, {"b_id": conversation_id, **{f"b_{k}": v for k, v in values.items()}})


_LINKS: dict[str, Any] = {}


def _link_identity(c: Connection, key: str, contact_id: UUID, at: datetime) -> None:
    """The identity belongs to the contact (inserted, or moved to it), unless an
    event newer than ``at`` put it where it is."""
    statement = _LINKS.get(c.dialect.name)
    if statement is None:
        dialect = postgresql if c.dialect.name == "postgresql" else sqlite
        insert_ = dialect.insert(q_identities)
        statement = insert_.on_conflict_do_update(
            index_elements=[q_identities.c.key],
            set_={
                "contact_id": insert_.excluded.contact_id,
                "linked_at": insert_.excluded.linked_at,
            },
            where=or_(
                q_identities.c.linked_at.is_(None),
                q_identities.c.linked_at <= insert_.excluded.linked_at,
            ),
        )
        _LINKS[c.dialect.name] = statement
    c.execute(statement, {"key": key, "contact_id": contact_id, "linked_at": at})


class QueueWriter:
    """Applies events to the read model, each at most once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def apply(self, event_type: str, event_id: str, data: bytes | None) -> bool:
        """Apply one event unless already applied; False if skipped or not ours."""
        return self.apply_many([(event_type, event_id, data)])[0]

    def apply_many(self, events: Sequence[tuple[str, str, bytes | None]]) -> list[bool]:
        """Apply a poll's events in order in one transaction (one commit, one fsync,
        instead of one per event); all or nothing: the consumer runtime splits a
        failing poll to find the event that fails. For each: False if it was
        skipped (applied before) or is not ours."""
        parsed = []
        for event_type, event_id, data in events:
            handler = HANDLERS.get(event_type)
            parsed.append(
                None if handler is None else (handler[1], event_id, read_data(data, handler[0]))
            )
        if not any(parsed):
            return [False] * len(events)
        done: list[bool] = []
        with self.engine.begin() as c:
            # The contacts whose conversations the poll changed, before and after each
            # event; their work (a function of their conversations, read by no
            # handler) is recomputed once for the whole poll, in its transaction.
            touched: set[UUID] = set()
            # By UUID, not by the id's text: "ABC..." and "abc..." are one event.
            ids = [None if item is None else UUID(item[1]) for item in parsed]
            new = self._first_times(c, [i for i in ids if i is not None])
            # Routed messages' rows, written together: no routed event reads another's
            # message; anything else may, so they are written before it.
            messages = _NewMessages()
            for item, event_uuid in zip(parsed, ids, strict=True):
                if item is None or event_uuid is None:
                    done.append(False)
                    continue
                handle, _, event = item
                first = event_uuid in new
                new.discard(event_uuid)  # the same event twice in a poll: applied once
                if first:
                    if isinstance(event, MessageRouted):
                        if event.message.id in messages.ids:  # (the router never does this)
                            messages.write(c)
                        # Its contacts come with the reads it makes anyway.
                        touched |= self._routed(c, event, messages)
                    else:
                        if _touches_messages(event):
                            messages.write(c)
                        touched |= _contacts_of(c, event)
                        handle(self, c, event)
                        touched |= _contacts_of(c, event)
                done.append(first)
            messages.write(c)
            self._refresh_contacts(c, touched)
        return done

    @staticmethod
    def _first_times(c: Connection, event_ids: Sequence[UUID]) -> set[UUID]:
        """Mark the events applied, in one statement; the ids not applied before."""
        if not event_ids:
            return set()
        now = _now()
        rows = [{"event_id": i, "applied_at": now} for i in dict.fromkeys(event_ids)]
        return {UUID(str(r.event_id)) for r in c.execute(_insert_ignoring(c, applied), rows)}

    @staticmethod
    def _refresh_contacts(c: Connection, contact_ids: set[UUID]) -> None:
        """Keep each contact's work (see q_contacts) a function of its conversations:
        one UPDATE with correlated subqueries (ix_queue_conversations_contact)."""
        if not contact_ids:
            return
        v = q_conversations.c

        def of_contact(expr: Any, *where: Any) -> Any:  # noqa: ANN401 - SQL expressions
            # A conversation an unmerge emptied is nobody's work (see _recount).
            return (
                select(expr)
                .where(v.contact_id == q_contacts.c.id, v.message_count > 0, *where)
                .scalar_subquery()
            )

        opened = of_contact(func.count(), v.status == "open")
        since = of_contact(func.min(v.oldest_unanswered_at), v.status == "open")
        c.execute(
            update(q_contacts)
            .where(q_contacts.c.id.in_(sorted(contact_ids)))
            .values(
                open_count=opened,
                waiting_since=since,
                wait_key=func.coalesce(since, literal(FAR, _TS)),
                last_activity=of_contact(func.max(v.last_message_at)),
                work=case(
                    (opened > 0, "open"),
                    (of_contact(func.count(), v.status == "waiting") > 0, "waiting"),
                    (of_contact(func.count()) > 0, "closed"),
                    else_=None,
                ),
            )
        )

    @staticmethod
    def _survivor(c: Connection, contact_id: UUID) -> UUID:
        return survivor(c, contact_id)

    def _ensure_contact(self, c: Connection, contact_id: UUID, owner: str, at: datetime) -> None:
        _upsert_ignore(
            c,
            q_contacts,
            {"id": contact_id, "owner": owner, "owner_at": at, "created_at": at},
        )

    def _set_owner(
        self,
        c: Connection,
        contact_id: UUID,
        owner: str,
        at: datetime,
        known: tuple[str, datetime] | None = None,
    ) -> str:
        """Record an owner fact unless a newer one is known; conversations follow.
        ``known``: the contact's owner and its time, when just read. Returns the
        contact's owner after it."""
        was, was_at = known or c.execute(_OWNER_FACT, {"id": contact_id}).one()
        if _aware(was_at) > at:  # type: ignore[operator]
            return str(was)
        if str(was) == owner:  # most routed events: the same owner, a newer time
            c.execute(_SET_OWNER_AT, {"b_id": contact_id, "b_at": at})
            return owner
        c.execute(_SET_OWNER, {"b_id": contact_id, "b_owner": owner, "b_at": at})
        c.execute(_CONVERSATIONS_OWNER, {"b_id": contact_id, "b_owner": owner})
        return owner

    @staticmethod
    def _owner_after_unmerge(c: Connection, contact_id: UUID, owner: str, at: datetime) -> None:
        """An owner fact of a merged-away contact newer than its merge (whose time
        its row holds) can only come from after an unmerge this read model has not
        seen yet: the row keeps it, and the unmerge then keeps the newer fact."""
        c.execute(_OWNER_AFTER_UNMERGE, {"b_id": contact_id, "b_owner": owner, "b_at": at})

    def _owner_of(self, c: Connection, contact_id: UUID) -> str:
        return str(c.execute(_OWNER, {"id": contact_id}).scalar_one())

    def _routed(
        self, c: Connection, e: MessageRouted, messages: _NewMessages | None = None
    ) -> set[UUID]:
        """A routed message into its conversation; returns the contacts whose
        conversations it changed (before and after it). The message row goes to
        ``messages`` (written by the caller) if given, else it is written here."""
        m = e.message
        # An unmerge applied before this event may have moved the message, or
        # given its conversation back to another contact.
        where = c.execute(
            _WHERE_ROUTED,
            {
                "message_id": m.id,
                "conversation_id": e.conversation_id,
                "contact_id": e.contact_id,
            },
        ).one()
        conversation_id = _uuid(where.moved) or e.conversation_id
        contact_id, owner = self._landing_contact(c, e, where)
        self._into_conversation(c, m, conversation_id, where, contact_id=contact_id, owner=owner)
        held = messages if messages is not None else _NewMessages()
        held.add(m, conversation_id, contact_id)
        # A new row, into which an unmerge applied first had moved messages.
        filled = where.landing_id is None and where.landing_held
        if messages is None or filled:
            held.write(c)
        if filled:
            # An unmerge applied first moved messages into it (a review found the
            # new row counting only this one): its summary from all it holds.
            self._recount(c, conversation_id)
        emptied = None
        if conversation_id != e.conversation_id and where.conversation_contact is None:
            # An unmerge applied first sent the message on: the conversation the
            # router put it in exists all the same, emptied, as it would if this
            # event had come first (messages another unmerge moved in counted).
            emptied = self._emptied(c, e)
        # The contacts whose conversations this changed: the ones the event's
        # conversation, the conversation the message landed in (an unmerge may have
        # moved it) and the message had before, and the one they have now.
        return {
            x
            for x in (
                _uuid(where.conversation_contact),
                _uuid(where.landing_contact_id),
                _uuid(where.message_contact),
                contact_id,
                emptied,
            )
            if x is not None
        }

    def _emptied(self, c: Connection, e: MessageRouted) -> UUID:
        """The event's own conversation, as the message's move left it; returns
        its contact."""
        contact_id = self._survivor(c, e.contact_id)
        at = e.message.received_at
        c.execute(
            _NEW_CONVERSATION,
            {
                "id": e.conversation_id,
                "contact_id": contact_id,
                "owner": c.execute(_OWNER, {"id": contact_id}).scalar() or e.owner,
                "status": "open",
                "channels": [],
                "oldest_unanswered_at": None,
                "started_at": at,
                "last_message_at": at,
                "last_preview": None,
                "message_count": 0,
            },
        )
        self._recount(c, e.conversation_id)
        return contact_id

    def _landing_contact(self, c: Connection, e: MessageRouted, where: Any) -> tuple[UUID, str]:  # noqa: ANN401 - a Row of _WHERE_ROUTED
        """The contact a routed message lands with and its owner, the event's owner
        fact recorded on the way."""
        # The event's contact as it lives on now. Ensuring a contact below inserts
        # only a missing row (merged into nothing), which leaves this the same.
        survivor = _uuid(where.merged) or e.contact_id
        went_back = _uuid(where.went_back)
        contact_id = self._survivor(c, went_back) if went_back else survivor
        known = where.owner_at is not None  # the event contact's row exists
        if not (known and contact_id == e.contact_id):
            self._ensure_contact(c, contact_id, e.owner, e.routed_at)
        # The event's owner is a fact about the contact it was routed to, wherever
        # an unmerge has put the message since. An event of a contact merged since
        # carries that contact's old owner: the survivor keeps its own.
        if survivor == e.contact_id:
            if contact_id != e.contact_id and not known:
                self._ensure_contact(c, e.contact_id, e.owner, e.routed_at)
            # Its fact as read above; a row missing then was just ensured with this one.
            fact = (str(where.owner), where.owner_at) if known else (e.owner, e.routed_at)
            after = self._set_owner(c, e.contact_id, e.owner, e.routed_at, fact)
            if contact_id == e.contact_id:
                return contact_id, after
        else:
            self._owner_after_unmerge(c, e.contact_id, e.owner, e.routed_at)
        return contact_id, self._owner_of(c, contact_id)

    @staticmethod
    def _into_conversation(
        c: Connection,
        m: InboundMessage,
        conversation_id: UUID,
        where: Any,  # noqa: ANN401 - a Row of _WHERE_ROUTED
        *,
        contact_id: UUID,
        owner: str,
    ) -> None:
        """The conversation (as ``where`` read it) with the message in it."""
        machine = m.flags.auto_reply or m.flags.bounce
        preview = (m.text_new or m.text or m.subject or "")[:PREVIEW]
        if where.landing_id is None:
            c.execute(
                _NEW_CONVERSATION,
                {
                    "id": conversation_id,
                    "contact_id": contact_id,
                    "owner": owner,
                    "status": "open",
                    "channels": [m.channel],
                    "oldest_unanswered_at": None if machine else m.received_at,
                    "started_at": m.received_at,
                    "last_message_at": m.received_at,
                    "last_preview": preview,
                    "message_count": 1,
                },
            )
            return
        # Emptied by an unmerge (_recount): its times are no one's.
        empty = where.landing_message_count == 0
        values: dict[str, Any] = {
            "contact_id": contact_id,
            "owner": owner,
            "channels": sorted({*where.landing_channels, m.channel}),
            "message_count": where.landing_message_count + 1,
        }
        if empty or m.received_at >= _aware(where.landing_last_message_at):  # type: ignore[operator]
            values["last_message_at"] = m.received_at
            values["last_preview"] = preview
        if empty or m.received_at < _aware(where.landing_started_at):  # type: ignore[operator]
            # An older message applied later (a rebuild reads the partitions
            # in another order; an unmerge moved it here).
            values["started_at"] = m.received_at
        if not machine:
            # A customer message (re)opens the conversation and waits for an answer.
            values["status"] = "open"
            oldest = _aware(where.landing_oldest_unanswered_at)
            values["oldest_unanswered_at"] = min(oldest or m.received_at, m.received_at)
        _update_conversation(c, conversation_id, values)

    def _duplicate(self, c: Connection, e: MessageDuplicate) -> None:
        current = c.execute(_INBOXES, {"id": e.original_message_id}).scalar()
        if current is None:
            return  # the original's routed event comes later; nothing to add to yet
        merged = sorted({*current, *(r.key for r in e.recipients)})
        c.execute(_SET_INBOXES, {"b_id": e.original_message_id, "b_in": merged})

    def _status(self, c: Connection, e: ConversationStatus) -> None:
        row = c.execute(
            select(q_conversations.c.status_at).where(q_conversations.c.id == e.conversation_id)
        ).first()
        if row is None or (row.status_at and _aware(row.status_at) > e.occurred_at):  # type: ignore[operator]
            return
        values: dict[str, Any] = {"status": e.status, "status_at": e.occurred_at}
        if e.status != "open":
            values["oldest_unanswered_at"] = None
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.id == e.conversation_id)
            .values(**values)
        )

    def _suggestion(self, c: Connection, e: ContactEvent) -> None:
        suggestions.apply(c, e)  # nothing moved: an agent decides

    def _contact(self, c: Connection, e: ContactEvent) -> None:
        contact_id = self._survivor(c, e.contact_id)
        self._ensure_contact(c, contact_id, e.owner or "unassigned", e.occurred_at)
        # An event of a contact merged since (its partition lags the survivor's)
        # carries that contact's old owner: the survivor keeps its own.
        own = contact_id == e.contact_id
        if e.kind == ContactEventKind.CREATED:
            # Its own row even when merged since: a merge never changes when a
            # contact was created, so an unmerge shows the true date, whatever order
            # the partitions came in.
            c.execute(_CREATED_AT, {"b_id": e.contact_id, "b_at": e.occurred_at})
        owned = e.kind in (ContactEventKind.CREATED, ContactEventKind.OWNER_ASSIGNED)
        if own and owned and e.owner:
            self._set_owner(c, contact_id, e.owner, e.occurred_at)
        elif owned and e.owner:
            self._owner_after_unmerge(c, e.contact_id, e.owner, e.occurred_at)
        if e.kind == ContactEventKind.MERGED:
            owner = e.owner or self._owner_of(c, contact_id)
            self._merge(c, contact_id, e.merged_contact_ids, e.occurred_at, owner)
        for key in e.identities:
            _link_identity(c, key, contact_id, e.occurred_at)

    def _merge(
        self, c: Connection, survivor: UUID, merged: Sequence[UUID], at: datetime, owner: str
    ) -> None:
        undone = _decided_since(c, merged, at)
        ids = [m for m in merged if m not in undone]
        if not ids:
            return
        # The merged contacts' own events travel on their partitions and may come
        # before or after this one. Their rows become a function of the merge alone
        # (the survivor's owner then, the merge's time), whatever came first, so a
        # rebuild that interleaves the partitions differently gives the same rows;
        # their later events resolve to the survivor.
        dialect = postgresql if c.dialect.name == "postgresql" else sqlite
        for contact_id in ids:
            row = {
                "owner": owner,
                "owner_at": at,
                "created_at": at,
                "merged_into": survivor,
                "merged_at": at,
            }
            statement = dialect.insert(q_contacts).values(id=contact_id, **row)
            c.execute(
                statement.on_conflict_do_update(
                    index_elements=[q_contacts.c.id],
                    set_={"merged_into": survivor, "merged_at": at},
                )
            )
        # An owner fact newer than the merge comes from after an unmerge of it
        # (see _owner_after_unmerge) and stays; older ones give way to the merge's.
        c.execute(
            update(q_contacts)
            .where(q_contacts.c.id.in_(ids), q_contacts.c.owner_at <= at)
            .values(owner=owner, owner_at=at)
        )
        c.execute(
            update(q_contacts)
            .where(or_(q_contacts.c.id.in_(ids), q_contacts.c.merged_into.in_(ids)))
            .values(merged_into=survivor)
        )
        c.execute(
            update(q_identities)
            .where(
                q_identities.c.contact_id.in_(ids),
                or_(q_identities.c.linked_at.is_(None), q_identities.c.linked_at <= at),
            )
            # Their link times stay: the merge only carries them along, and an older
            # unmerge applied later may still give one of them back (a review found
            # a stamped time made it lose).
            .values(contact_id=survivor)
        )
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.contact_id.in_(ids))
            .values(contact_id=survivor, owner=self._owner_of(c, survivor))
        )
        c.execute(
            update(q_messages).where(q_messages.c.contact_id.in_(ids)).values(contact_id=survivor)
        )

    def _unmerge(self, c: Connection, e: ContactEvent) -> None:
        """``contact.unmerged``: the contact, its identities, the contacts merged
        into it before, its conversations and the moved messages go back; the facts
        stay for the routed events still to come."""
        restored, at, owner = e.contact_id, e.occurred_at, e.owner or "unassigned"
        dialect = postgresql if c.dialect.name == "postgresql" else sqlite

        def upsert(table: Table, row: dict[str, Any], key: str) -> None:
            values = {k: v for k, v in row.items() if k != key}
            statement = dialect.insert(table).values(**row)
            c.execute(statement.on_conflict_do_update(index_elements=[key], set_=values))

        # The latest unmerge of the contact is what stale merges are checked against.
        latest = dialect.insert(q_unmerges).values(contact_id=restored, unmerged_at=at)
        c.execute(
            latest.on_conflict_do_update(
                index_elements=[q_unmerges.c.contact_id],
                set_={"unmerged_at": at},
                where=q_unmerges.c.unmerged_at < latest.excluded.unmerged_at,
            )
        )
        _upsert_ignore(
            c, q_contacts, {"id": restored, "owner": owner, "owner_at": at, "created_at": at}
        )
        # A merge of the contact newer than this unmerge (its partition came first)
        # stands: the contact stays merged, and what the unmerge gives back goes to
        # the contact it lives on as, as if the events had come in order.
        merged_into, merged_at = c.execute(
            select(q_contacts.c.merged_into, q_contacts.c.merged_at).where(
                q_contacts.c.id == restored
            )
        ).one()
        if merged_at is not None and _aware(merged_at) > at:  # type: ignore[operator]
            home = UUID(str(merged_into))  # what survivor() would read again
        else:
            home = restored
            c.execute(
                update(q_contacts)
                .where(q_contacts.c.id == restored)
                .values(merged_into=None, merged_at=None)
            )
        self._set_owner(c, restored, owner, at)
        # The contacts merged into it before follow it (to where it lives on, as
        # one link: survivor() follows one), unless an unmerge or merge of their
        # own newer than this one already decided where they are.
        undone = _decided_since(c, e.merged_contact_ids, at)
        for earlier in e.merged_contact_ids:
            if earlier in undone:
                continue
            # A row made here holds no owner fact (the time sorts before every
            # real one): its merge's, whenever applied, gives it one.
            row = {"owner": owner, "owner_at": _NO_FACT, "created_at": at, "merged_into": home}
            statement = dialect.insert(q_contacts).values(id=earlier, **row)
            c.execute(
                statement.on_conflict_do_update(
                    index_elements=[q_contacts.c.id], set_={"merged_into": home}
                )
            )
        for key in e.identities:
            _link_identity(c, key, home, at)
        back = list(e.conversation_ids)
        for conversation_id in back:
            upsert(
                q_unmerged_conversations,
                {"conversation_id": conversation_id, "contact_id": restored},
                "conversation_id",
            )
        if back:
            c.execute(
                update(q_conversations)
                .where(q_conversations.c.id.in_(back))
                .values(contact_id=home, owner=self._owner_of(c, home))
            )
            c.execute(
                update(q_messages)
                .where(q_messages.c.conversation_id.in_(back))
                .values(contact_id=home)
            )
        other = self._survivor(c, e.other_contact_id) if e.other_contact_id else restored
        touched: set[UUID] = set()
        for move in e.moved_messages:
            upsert(
                q_unmerged_messages,
                {"message_id": move.message_id, "conversation_id": move.conversation_id},
                "message_id",
            )
            was = c.execute(
                select(q_messages.c.conversation_id).where(q_messages.c.id == move.message_id)
            ).scalar()
            if was is None:
                continue  # its routed event comes later and finds the fact
            touched |= {UUID(str(was)), move.conversation_id}
            c.execute(
                update(q_messages)
                .where(q_messages.c.id == move.message_id)
                .values(
                    conversation_id=move.conversation_id,
                    contact_id=home if move.conversation_id in back else other,
                )
            )
        for conversation_id in sorted(touched):
            self._recount(c, conversation_id)

    @staticmethod
    def _recount(c: Connection, conversation_id: UUID) -> None:
        """A conversation's summary from the messages it holds now."""
        conversation = c.execute(
            select(q_conversations).where(q_conversations.c.id == conversation_id)
        ).first()
        found = c.execute(
            select(q_messages)
            .where(q_messages.c.conversation_id == conversation_id)
            .order_by(q_messages.c.received_at, q_messages.c.id)
        ).all()
        if conversation is None:
            return
        if not found:
            # Emptied (its messages moved on): nothing to show or answer. The row
            # stays (its status, and messages an unmerge may move in later), with
            # times that no longer count: the next message into it sets them afresh
            # (_into_conversation), and readers skip it (message_count 0).
            c.execute(
                update(q_conversations)
                .where(q_conversations.c.id == conversation_id)
                .values(message_count=0, channels=[], last_preview=None, oldest_unanswered_at=None)
            )
            return
        last = found[-1]
        since = _aware(conversation.status_at)
        waiting = [
            _aware(m.received_at)
            for m in found
            if not (m.auto_reply or m.bounce) and (since is None or _aware(m.received_at) > since)  # type: ignore[operator]
        ]
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.id == conversation_id)
            .values(
                message_count=len(found),
                channels=sorted({m.channel for m in found}),
                started_at=found[0].received_at,
                last_message_at=last.received_at,
                last_preview=(last.text_new or last.text or last.subject or "")[:PREVIEW],
                oldest_unanswered_at=(
                    min(waiting)  # type: ignore[type-var]
                    if conversation.status == "open" and waiting
                    else None
                ),
            )
        )

    def reset(self) -> None:
        """Empty the read model (for a rebuild from the earliest offsets)."""
        with self.engine.begin() as c:
            for table in TABLES:
                c.execute(delete(table))
            search.for_dialect(c.dialect.name).reset(c)


class _NewMessages:
    """Routed messages' rows held back and written in one statement each for the
    messages, their search documents and their attachments (on PostgreSQL one
    round trip each instead of two or three per message)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.documents: dict[UUID, str] = {}
        self.attachments: dict[UUID, list[dict[str, Any]]] = {}
        self.ids: set[UUID] = set()

    def add(self, m: InboundMessage, conversation_id: UUID, contact_id: UUID) -> None:
        attachments = [a.model_dump(mode="json") for a in m.attachments]
        self.rows.append(
            {
                "id": m.id,
                "conversation_id": conversation_id,
                "contact_id": contact_id,
                "received_at": m.received_at,
                "channel": m.channel,
                "sender": m.sender.key,
                "sender_name": m.sender.display_name,
                "subject": m.subject,
                "text": m.text,
                "text_new": m.text_new,
                "html": m.html,
                "attachments": attachments,
                "auto_reply": m.flags.auto_reply,
                "bounce": m.flags.bounce,
                "inboxes": sorted({r.key for r in m.recipients}),
                "sender_verified": m.sender.assurance == Assurance.VERIFIED,
                "sender_evidence": m.sender.evidence,
                "verified_keys": "\n".join(
                    sorted({i.key for i in m.identities if i.assurance == Assurance.VERIFIED})
                )
                or None,
                "authentication": (
                    m.authentication.model_dump(mode="json") if m.authentication else None
                ),
                "mail_message_id": m.thread.message_id,
                "mail_references": " ".join(m.thread.references[-10:]) or None,
            }
        )
        self.ids.add(m.id)
        self.documents[m.id] = search.document(
            m.sender.display_name, m.subject, m.text_new or m.text
        )
        stored = {
            sha256: a
            for a in attachments
            if isinstance(sha256 := (a.get("blob") or {}).get("sha256"), str)
        }
        if stored:
            self.attachments[m.id] = [
                {"sha256": h, "message_id": m.id, "attachment": a} for h, a in stored.items()
            ]

    def write(self, c: Connection) -> None:
        """The messages not stored before, with their search documents and
        attachments; a message stored before (a replay) keeps its row."""
        if not self.rows:
            return
        statement = _insert_ignoring(c, q_messages)
        inserted = [UUID(str(i)) for i in c.execute(statement, self.rows).scalars()]
        search.for_dialect(c.dialect.name).index_many(c, [(i, self.documents[i]) for i in inserted])
        attachments = [a for i in inserted for a in self.attachments.get(i, ())]
        if attachments:
            c.execute(_ATTACHMENTS, attachments)
        self.rows.clear()
        self.documents.clear()
        self.attachments.clear()
        self.ids.clear()


# The events whose handlers neither read nor write queue_messages: the messages
# held back may be written after them. (A kind not listed here, or added later,
# has them written first.)
_LEAVE_MESSAGES = frozenset(
    {
        ContactEventKind.CREATED,
        ContactEventKind.IDENTITY_LINKED,
        ContactEventKind.OWNER_ASSIGNED,
        ContactEventKind.MERGE_SUGGESTED,
        ContactEventKind.MERGE_DISMISSED,
    }
)


def _decided_since(c: Connection, contact_ids: Sequence[UUID], at: datetime) -> set[UUID]:
    """The contacts an unmerge or a merge newer than ``at`` already placed (its
    partition came first): an older merge or unmerge leaves them where they are."""
    if not contact_ids:
        return set()
    ids = list(contact_ids)
    unmerged = select(q_unmerges.c.contact_id).where(
        q_unmerges.c.contact_id.in_(ids), q_unmerges.c.unmerged_at > at
    )
    merged = select(q_contacts.c.id).where(q_contacts.c.id.in_(ids), q_contacts.c.merged_at > at)
    return {UUID(str(x)) for x in c.execute(unmerged.union(merged)).scalars()}


def _touches_messages(event: BaseModel) -> bool:
    if isinstance(event, ConversationStatus):
        return False
    return not (isinstance(event, ContactEvent) and event.kind in _LEAVE_MESSAGES)


def _contacts_of(c: Connection, event: BaseModel) -> set[UUID]:
    """The contacts whose conversations an event may change (asked before and after
    its handler runs: a conversation can leave one contact for another)."""
    # (A routed event's come from its own reads: QueueWriter._routed.)
    found: set[UUID] = set()
    conversations: list[UUID] = []
    if isinstance(event, ConversationStatus):
        conversations.append(event.conversation_id)
    elif isinstance(event, ContactEvent):
        found |= {event.contact_id, *event.merged_contact_ids}
        if event.other_contact_id:
            found.add(event.other_contact_id)
        conversations.extend(event.conversation_ids)
        conversations.extend(m.conversation_id for m in event.moved_messages)
    if conversations:
        found |= {
            UUID(str(x))
            for x in c.execute(
                select(q_conversations.c.contact_id).where(q_conversations.c.id.in_(conversations))
            ).scalars()
        }
    found |= {survivor(c, x) for x in list(found)}
    return found


#: Event type -> (its model, the handler that applies it).
HANDLERS: dict[str, tuple[type[BaseModel], Handler]] = {
    TYPE_ROUTED: (MessageRouted, QueueWriter._routed),
    TYPE_DUPLICATE: (MessageDuplicate, QueueWriter._duplicate),
    TYPE_CONVERSATION_STATUS: (ConversationStatus, QueueWriter._status),
    **{contact_event_type(kind): (ContactEvent, QueueWriter._contact) for kind in ContactEventKind},
    contact_event_type(ContactEventKind.MERGE_SUGGESTED): (ContactEvent, QueueWriter._suggestion),
    contact_event_type(ContactEventKind.MERGE_DISMISSED): (ContactEvent, QueueWriter._suggestion),
    contact_event_type(ContactEventKind.UNMERGED): (ContactEvent, QueueWriter._unmerge),
}
