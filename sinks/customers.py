"""The queue's customer-level reads: an owner's customers (one item per contact
with work, keyset-paginated on ix_queue_contacts_work), the customer card, and
search; built on :class:`QueueReader`'s conversation-level reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, func, select

from sinks import search
from sinks.queue_read import (
    _FAR,
    MESSAGES_PAGE,
    NotFound,
    Page,
    QueueReader,
    _after,
    _cursor_of,
    _iso,
    _message,
    identity_item,
    message_page,
    proven_identities,
)
from sinks.queue_tables import (
    PREVIEW,
    _aware,
    q_contacts,
    q_conversations,
    q_identities,
    q_messages,
    survivor,
)


class CustomerReader(QueueReader):
    """Customers, the card, search."""

    def known_owner(self, owner: str) -> bool:
        """A configured team or agent, or an owner some contact has."""
        if owner in self.teams or any(owner in agents for agents in self.teams.values()):
            return True
        with self.engine.connect() as c:
            return (
                c.execute(
                    select(q_contacts.c.id).where(q_contacts.c.owner == owner).limit(1)
                ).first()
                is not None
            )

    def teams_of(self, agent: str) -> list[str]:
        return sorted(team for team, agents in self.teams.items() if agent in agents)

    def customers(
        self, owner: str, *, status: str = "open", limit: int = 50, cursor: str | None = None
    ) -> Page:
        """One item per contact with work of that status for the owner (an agent, or
        a team: itself and its agents): oldest waiting first, then oldest activity.
        A keyset range of ix_queue_contacts_work (owner, work, wait_key,
        last_activity, id); only the page's contacts are then described."""
        who = [owner, *self.teams.get(owner, ())]
        k = q_contacts.c
        key = (k.wait_key, k.last_activity, k.id)
        query = select(q_contacts).where(k.owner.in_(who), k.merged_into.is_(None))
        query = query.where(k.work.is_not(None) if status == "all" else k.work == status)
        if cursor is not None:
            query = query.where(_after(key, cursor))
        with self.engine.connect() as c:
            rows = c.execute(query.order_by(*key).limit(limit + 1)).all()
            page = rows[:limit]
            items = _describe(c, page)
        next_cursor = None
        if len(rows) > limit and page:
            last_row = page[-1]
            next_cursor = _cursor_of(
                _aware(last_row.wait_key) or _FAR,
                _aware(last_row.last_activity) or _FAR,
                last_row.id,
            )
        return Page(items, next_cursor)

    def card(
        self,
        contact_id: UUID,
        *,
        limit: int = MESSAGES_PAGE,
        before: str | None = None,
        conversation: UUID | None = None,
    ) -> dict[str, Any]:
        """The customer card: the contact (as :meth:`contact`), described as in the
        queue, with its newest ``limit`` messages (before the cursor ``before``) in
        their conversations, newest conversation first, and the contacts merged into
        it. ``older`` is the cursor of the page before (None at the first message).

        Every conversation that is not closed is listed, with the messages of it
        the page holds (maybe none: a stranger writing thirty times as the customer
        must not push the customer's open conversation off the card); a closed one
        when the page holds some of its messages. With ``conversation``, only that
        conversation and its own newest messages (NotFound if it is not this
        customer's)."""
        found = self.contact(contact_id)
        live = UUID(found["id"])
        wanted = str(conversation) if conversation is not None else None
        if wanted is not None and all(v["id"] != wanted for v in found["conversations"]):
            raise NotFound(wanted)
        where = (
            q_messages.c.contact_id == live
            if conversation is None
            else q_messages.c.conversation_id == conversation
        )
        with self.engine.connect() as c:
            row = c.execute(select(q_contacts).where(q_contacts.c.id == live)).one()
            (summary,) = _describe(c, [row])
            merged = c.execute(
                # When merged: the merge's time (migration queue_0008), else its
                # owner fact (a merge sets it, for rows from before that migration).
                select(
                    q_contacts.c.id,
                    func.coalesce(q_contacts.c.merged_at, q_contacts.c.owner_at).label("at"),
                )
                .where(q_contacts.c.merged_into == live)
                .order_by("at", q_contacts.c.id)
            ).all()
            messages, older = message_page(c, where, limit, before)
        by_conversation: dict[str, list[dict[str, Any]]] = {}
        for m in messages:
            by_conversation.setdefault(str(m.conversation_id), []).append(_message(m))

        def listed(conv: dict[str, Any]) -> bool:
            if wanted is not None:
                return bool(conv["id"] == wanted)
            if conv["id"] in by_conversation:
                return True
            return bool(conv["status"] != "closed" and conv["message_count"] > 0)

        conversations = [
            {**conv, "messages": by_conversation.get(conv["id"], [])}
            for conv in found["conversations"]
            if listed(conv)
        ]
        return {
            **found,
            **summary,
            "conversations": conversations,
            "older": older,
            "conversation": wanted,
            "merged_contacts": [{"id": str(r.id), "merged_at": _iso(r.at)} for r in merged],
        }

    def search(
        self, text: str, identity_keys: Sequence[str], *, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Contacts by identity (keys already canonical), then by the words of their
        names, subjects and texts; each once, as its surviving contact."""
        order: list[UUID] = []
        matched: dict[UUID, dict[str, Any]] = {}
        with self.engine.connect() as c:

            def add(contact: UUID, how: dict[str, Any]) -> None:
                live = survivor(c, contact)
                if live not in matched:
                    order.append(live)
                    matched[live] = how

            if identity_keys:
                for key, contact in c.execute(
                    select(q_identities.c.key, q_identities.c.contact_id).where(
                        q_identities.c.key.in_(list(identity_keys))
                    )
                ):
                    add(UUID(str(contact)), {"by": "identity", "identity": key})
            hits = search.for_dialect(c.dialect.name).find(c, text, limit * 10)
            if hits:
                rows = c.execute(
                    select(q_messages.c.id, q_messages.c.contact_id).where(
                        q_messages.c.id.in_(hits)
                    )
                ).all()
                contact_of = {UUID(str(r.id)): UUID(str(r.contact_id)) for r in rows}
                for hit in hits:
                    if hit in contact_of and len(order) < limit:
                        add(contact_of[hit], {"by": "text", "message_id": str(hit)})
            found = c.execute(select(q_contacts).where(q_contacts.c.id.in_(order[:limit]))).all()
            described = {item["contact_id"]: item for item in _describe(c, found)}
        return [
            {**described[str(x)], "matched": matched[x]}
            for x in order[:limit]
            if str(x) in described
        ]


def _describe(c: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Queue items for these queue_contacts rows, in their order: a handful of
    statements for the whole page (identities, the latest message, channels)."""
    ids = [r.id for r in rows]
    if not ids:
        return []
    keys: dict[str, list[str]] = {}
    for key, contact in c.execute(
        select(q_identities.c.key, q_identities.c.contact_id)
        .where(q_identities.c.contact_id.in_(ids))
        .order_by(q_identities.c.key)
    ):
        keys.setdefault(str(contact), []).append(key)
    m = q_messages.c
    proven = proven_identities(c, ids)
    latest_rank = (
        func.row_number()
        .over(partition_by=m.contact_id, order_by=(m.received_at.desc(), m.id.desc()))
        .label("rank")
    )
    latest_q = (
        select(
            m.contact_id, m.subject, m.text_new, m.text, m.sender, m.sender_verified, latest_rank
        )
        .where(m.contact_id.in_(ids), m.bounce.is_(False), m.auto_reply.is_(False))
        .subquery()
    )
    latest = {str(r.contact_id): r for r in c.execute(select(latest_q).where(latest_q.c.rank == 1))}
    # The name a verified sender gave wins over any claimed one, then the latest: a
    # stranger's form post naming a customer's address renamed the customer on every
    # agent's list (attacker review, 2026-11-30).
    named_rank = (
        func.row_number()
        .over(
            partition_by=m.contact_id,
            order_by=(m.sender_verified.desc(), m.received_at.desc(), m.id.desc()),
        )
        .label("rank")
    )
    named_q = (
        select(m.contact_id, m.sender_name, named_rank)
        .where(m.contact_id.in_(ids), m.sender_name.is_not(None), m.bounce.is_(False))
        .subquery()
    )
    names = {
        str(r.contact_id): r.sender_name
        for r in c.execute(select(named_q).where(named_q.c.rank == 1))
    }
    channels: dict[str, set[str]] = {}
    for contact, found in c.execute(
        select(q_conversations.c.contact_id, q_conversations.c.channels).where(
            q_conversations.c.contact_id.in_(ids)
        )
    ):
        channels.setdefault(str(contact), set()).update(found)
    items = []
    for r in rows:
        cid = str(r.id)
        identities = [identity_item(k, (cid, k) in proven) for k in keys.get(cid, [])]
        last = latest.get(cid)
        body = (last.text_new or last.text or "") if last is not None else ""
        first_line = next((line.strip() for line in body.splitlines() if line.strip()), "")
        name = names.get(cid)
        if not name or "@" in name or "<" in name:
            name = identities[0]["value"] if identities else (last.sender if last else cid[:8])
        items.append(
            {
                "contact_id": cid,
                "name": name,
                "identities": identities,
                "subject": last.subject if last is not None else None,
                "first_line": first_line[:PREVIEW],
                # The latest message's sender was only claimed, while the channels
                # proved some identity of this customer: a stranger's form post
                # naming a customer's address was the row's preview, unmarked
                # (review, 2026-12-01). Null without a message.
                "latest_claimed": (
                    None
                    if last is None
                    else not last.sender_verified
                    and any(i["assurance"] == "verified" for i in identities)
                ),
                "channels": sorted(channels.get(cid, set())),
                "open_conversations": r.open_count,
                "work": r.work,
                "waiting_since": _iso(r.waiting_since),
                "last_activity": _iso(r.last_activity),
                "owner": r.owner,
            }
        )
    return items
