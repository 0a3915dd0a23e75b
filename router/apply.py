"""Applying a routing decision: the rows it writes (contacts, identities,
conversations, messages, merges) and the events it causes; one dead-letter
builder for everything the router refuses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    DeadLetter,
    InboundMessage,
    MessageDuplicate,
    MessageRouted,
)
from router.decide import (
    Decision,
    Duplicate,
    Routed,
    RoutingConfig,
    Unroutable,
    derived_id,
)
from router.directory import BatchDirectory
from router.outbox import make_event
from router.tables import utcnow
from router.writes import Merge, Writes
from switchboard.events import (
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    Event,
    contact_event_type,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What routing one message produced: the events to publish, and a label."""

    message_id: UUID
    result: str  # routed, duplicate, unroutable, failed, replayed
    events: tuple[Event, ...]
    reason: str = ""


def dead_letter(
    message: InboundMessage, reason: str, detail: str, metadata: dict[str, Any]
) -> Event:
    """The router's dead letter for a message: the original payload and why."""
    letter = DeadLetter(
        id=derived_id(message.id, "dead-letter"),
        stage="router",
        adapter=message.adapter,
        reason=reason,
        detail=detail[:4000],
        occurred_at=utcnow(),
        raw=message.raw,
        source_event_id=str(message.id),
        metadata={"dedupe_key": message.dedupe_key, **metadata},
    )
    return make_event(TYPE_DEADLETTER, message.partition_key, letter, letter.id)


def apply(
    message: InboundMessage,
    decision: Decision,
    directory: BatchDirectory,
    config: RoutingConfig,
) -> Outcome:
    """Hold back a decision's rows (:class:`router.writes.Writes`), keep the batch's
    directory current, and build the decision's events (recorded by the caller)."""
    now = utcnow()
    if isinstance(decision, Unroutable):
        log.warning(
            "message not routable",
            extra={"message_id": str(message.id), "reason": decision.reason},
        )
        event = dead_letter(
            message, decision.reason, decision.detail, {"sender": message.sender.key}
        )
        return Outcome(message.id, "unroutable", (event,), decision.reason)
    if isinstance(decision, Duplicate):
        return apply_duplicate(message, decision, now, directory)
    return apply_routed(message, decision, now, directory, config)


def apply_duplicate(
    message: InboundMessage, decision: Duplicate, now: datetime, directory: BatchDirectory
) -> Outcome:
    original = decision.original
    directory.writes.add_inboxes(original.message_id, {r.key for r in message.recipients}, now)
    if decision.redelivery:
        return Outcome(message.id, "replayed", ())
    data = MessageDuplicate(
        event_id=decision.event_id,
        message_id=message.id,
        original_message_id=original.message_id,
        contact_id=original.contact_id,
        conversation_id=original.conversation_id,
        dedupe_key=message.dedupe_key,
        channel=message.channel,
        adapter=message.adapter,
        recipients=message.recipients,
        received_at=message.received_at,
    )
    event = make_event(TYPE_DUPLICATE, str(original.contact_id), data, decision.event_id)
    return Outcome(message.id, "duplicate", (event,), "duplicate")


def apply_routed(
    message: InboundMessage,
    d: Routed,
    now: datetime,
    directory: BatchDirectory,
    config: RoutingConfig,
) -> Outcome:
    writes = directory.writes
    events: list[Event] = []
    previous_owner: str | None = None
    if d.new_contact:
        writes.new_contact(d.contact_id, d.owner, now)
        directory.created(d.contact_id, d.owner, now)
    else:
        previous_owner = directory.owner_of(d.contact_id)
        if d.owner_changed:
            writes.set_owner(d.contact_id, d.owner, now)
            directory.owner_changed(d.contact_id, d.owner)
    if d.merged:
        events.append(merge_automatic(message, d, now, directory))
        directory.merged(d.contact_id, d.merged)
    if d.link:
        writes.link(d.contact_id, d.link, message.id, now)
        directory.linked(d.contact_id, d.link)
    if d.refused:
        log.warning(
            "identity link refused: the contact has the maximum of that kind",
            extra={
                "message_id": str(message.id),
                "contact_id": str(d.contact_id),
                "refused": list(d.refused),
            },
        )
    events.extend(contact_events(message, d, now, previous_owner))
    events.extend(suggestion_events(message, d, now))
    if d.assign_cursor is not None:
        team = config.teams[d.assign_cursor]
        cursor = (team.agents.index(d.owner) + 1) % len(team.agents)
        writes.cursor(team.name, cursor)
        directory.cursor(team.name, cursor)
    if d.new_conversation:
        writes.new_conversation(d.conversation_id, d.contact_id, d.owner, message.received_at)
    else:
        writes.add_to_conversation(d.conversation_id, message.received_at)
    directory.conversation_used(
        d.contact_id, d.conversation_id, message.received_at, new=d.new_conversation
    )
    writes.messages.append(
        {
            "id": message.id,
            "dedupe_key": message.dedupe_key,
            "contact_id": d.contact_id,
            "conversation_id": d.conversation_id,
            "channel": message.channel,
            "email_message_id": message.thread.message_id,
            "received_at": message.received_at,
            "routed_at": now,
            "owner": d.owner,
            "reason": d.reason,
            "identity_keys": "\n".join(i.key for i in message.all_identities()),
        }
    )
    writes.add_inboxes(message.id, sorted({r.key for r in message.recipients}), now)
    if message.dedupe_key in directory.stale:
        writes.forget.add(message.dedupe_key)
    writes.dedupe.append({"key": message.dedupe_key, "message_id": message.id, "seen_at": now})
    directory.routed(message, d.contact_id, d.conversation_id)
    routed = MessageRouted(
        event_id=d.event_id,
        message=message,
        contact_id=d.contact_id,
        conversation_id=d.conversation_id,
        owner=d.owner,
        reason=d.reason,
        new_contact=d.new_contact,
        new_conversation=d.new_conversation,
        merged_contact_ids=d.merged,
        routed_at=now,
    )
    events.append(make_event(TYPE_ROUTED, str(d.contact_id), routed, d.event_id))
    return Outcome(message.id, "routed", tuple(events), d.reason)


def merge_automatic(
    message: InboundMessage, d: Routed, now: datetime, directory: BatchDirectory
) -> Event:
    """A merge the router decided: held back with the batch's writes (in order),
    the identities that move known from the batch's directory."""
    event_id = derived_id(message.id, "contact-merged")
    moved: set[str] = set()
    for merged_id in d.merged:
        moved |= directory.identities_of(merged_id)
        merge_id = derived_id(event_id, f"merge:{merged_id}")
        directory.writes.merges.append(Merge(merge_id, d.contact_id, merged_id, now, message.id))
    log.info(
        "contacts merged",
        extra={
            "survivor": str(d.contact_id),
            "merged": [str(m) for m in d.merged],
            "message_id": str(message.id),
        },
    )
    return contact_event(
        ContactEventKind.MERGED,
        d.contact_id,
        event_id,
        now,
        identities=tuple(sorted(moved)),
        merged_contact_ids=d.merged,
        owner=d.owner,  # the survivor's, which it keeps
        message_id=message.id,
        display_name=message.sender.display_name,
    )


def merge_contacts(
    c: Connection, survivor: UUID, merged: UUID, now: datetime, *, event_id: UUID, by: str | None
) -> list[str]:
    """An agent's merge of ``merged`` into ``survivor``, now: what it had is recorded
    (``contact_merges``/``contact_merge_items``, for an unmerge) and moves; returns
    the identity keys that moved, sorted."""
    writes = Writes()
    merge_id = derived_id(event_id, f"merge:{merged}")
    writes.merges.append(Merge(merge_id, survivor, merged, now, by=by))
    return writes.flush(c, now)[merge_id]


def contact_event(
    kind: ContactEventKind,
    contact_id: UUID,
    event_id: UUID,
    occurred_at: datetime,
    **fields: Any,  # noqa: ANN401 - ContactEvent's optional fields
) -> Event:
    data = ContactEvent(
        event_id=event_id, kind=kind, contact_id=contact_id, occurred_at=occurred_at, **fields
    )
    return make_event(contact_event_type(kind), str(contact_id), data, event_id)


def suggestion_events(message: InboundMessage, d: Routed, now: datetime) -> list[Event]:
    """merge.suggested for each merge only an agent may confirm (the identity is
    claimed, or the policy is manual); the contacts stay apart meanwhile."""
    if d.suggestions:
        log.info(
            "merge suggested, not made",
            extra={
                "message_id": str(message.id),
                "contact_id": str(d.contact_id),
                "others": [str(o) for o, _ in d.suggestions],
            },
        )
    return [
        contact_event(
            ContactEventKind.MERGE_SUGGESTED,
            d.contact_id,
            derived_id(message.id, f"merge-suggested:{other}:{key}"),
            now,
            identities=(key,),
            other_contact_id=other,
            message_id=message.id,
        )
        for other, key in d.suggestions
    ]


def contact_events(
    message: InboundMessage, d: Routed, now: datetime, previous_owner: str | None
) -> list[Event]:
    """contact.created for a new contact; else identity.linked and owner.assigned."""

    def event(kind: ContactEventKind, **fields: Any) -> Event:  # noqa: ANN401
        return contact_event(
            kind,
            d.contact_id,
            derived_id(message.id, kind.value.replace(".", "-")),
            now,
            message_id=message.id,
            display_name=message.sender.display_name,
            **fields,
        )

    if d.new_contact:
        return [event(ContactEventKind.CREATED, identities=d.link, owner=d.owner, reason=d.reason)]
    events = []
    if d.link:
        events.append(event(ContactEventKind.IDENTITY_LINKED, identities=d.link))
    if d.owner_changed:
        events.append(
            event(
                ContactEventKind.OWNER_ASSIGNED,
                owner=d.owner,
                previous_owner=previous_owner,
                reason=d.reason,
            )
        )
    return events
