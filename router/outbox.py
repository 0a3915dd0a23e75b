"""The router's outbox (``router_events``): every event a message caused is
recorded in the transaction that routed it, so a redelivered message re-emits
the very same events; events recorded outside a Kafka record (an agent's
actions) wait as pending until published."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import (
    Connection,
    Engine,
    insert,
    select,
    update,
)

from router.tables import aware, outbox
from switchboard.blobs import BLOB_REF
from switchboard.events import (
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    Event,
)
from switchboard.ids import uuid7
from switchboard.topics import CONTACTS, DEADLETTER, ROUTED

SOURCE = "switchboard/router"


def make_event(type_: str, key: str, data: BaseModel, event_id: UUID) -> Event:
    return Event(type=type_, source=SOURCE, key=key, data=data, id=str(event_id))


def new_event_uuid() -> UUID:
    return uuid7()


def record(
    c: Connection, message_id: UUID | None, events: Sequence[Event], *, pending: bool = False
) -> None:
    if events:
        c.execute(insert(outbox), event_rows(message_id, events, pending=pending))


def event_rows(
    message_id: UUID | None, events: Sequence[Event], *, pending: bool = False
) -> list[dict[str, object]]:
    """The outbox rows of a message's events, in order."""
    return [
        {
            "id": UUID(e.id),
            "message_id": message_id,
            "seq": seq,
            "topic": topic_of(e),
            "key": e.key,
            "type": e.type,
            "source": e.source,
            "time": e.time,
            "data": e.value(),
            "pending": pending,
        }
        for seq, e in enumerate(events)
    ]


def pending(engine: Engine, limit: int = 500) -> list[Event]:
    """Events recorded outside a Kafka record (manual assignments) not yet published."""
    with engine.connect() as c:
        found = c.execute(
            select(outbox).where(outbox.c.pending.is_(True)).order_by(outbox.c.time).limit(limit)
        ).all()
    return [stored(row) for row in found]


def mark_published(engine: Engine, event_ids: Sequence[str]) -> None:
    """Several routers' relays mark the same pending events: the rows are locked by
    id first, whatever plan the update gets (by id once the table is analyzed, in
    table order before), or two relays can take two events in opposite orders
    (deadlock detected)."""
    if not event_ids:
        return
    ids = sorted({UUID(e) for e in event_ids})
    with engine.begin() as c:
        c.execute(
            select(outbox.c.id).where(outbox.c.id.in_(ids)).order_by(outbox.c.id).with_for_update()
        )
        c.execute(update(outbox).where(outbox.c.id.in_(ids)).values(pending=False))


def referenced_blobs(engine: Engine, among: Collection[str]) -> set[str]:
    """Which of these blobs a recorded event still references (raw payloads and
    attachments of routed messages, until :meth:`purge` forgets the events)."""
    found: set[str] = set()
    with engine.connect() as c:
        rows = c.execution_options(yield_per=1000).execute(select(outbox.c.data))
        for data in rows.scalars():
            found.update(m.decode() for m in BLOB_REF.findall(bytes(data)))
    return found & set(among)


_TOPIC_BY_TYPE = {TYPE_DEADLETTER: DEADLETTER, TYPE_ROUTED: ROUTED, TYPE_DUPLICATE: ROUTED}


def topic_of(event: Event) -> str:
    """The topic a router event belongs on, from its type (contact events otherwise)."""
    return _TOPIC_BY_TYPE.get(event.type, CONTACTS)


def stored(row: Any) -> Event:  # noqa: ANN401 - a Row of router_events
    return Event(
        type=row.type,
        source=row.source,
        key=row.key,
        data=bytes(row.data),
        id=str(row.id),
        time=aware(row.time),
    )


def recorded(engine: Engine, message_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """message id -> [(event id, topic)] recorded for it, for the recorded ones."""
    found: dict[str, list[tuple[str, str]]] = {}
    with engine.connect() as c:
        rows = c.execute(
            select(outbox.c.message_id, outbox.c.id, outbox.c.topic)
            .where(outbox.c.message_id.in_([UUID(m) for m in message_ids]))
            .order_by(outbox.c.message_id, outbox.c.seq)
        ).all()
    for message_id, event_id, topic in rows:
        found.setdefault(str(message_id), []).append((str(event_id), topic))
    return found


def recorded_events(
    engine: Engine, message_ids: Sequence[str], topics: Collection[str]
) -> list[tuple[str, Event]]:
    """(topic, event) recorded for these messages on these topics, in time order."""
    with engine.connect() as c:
        rows = c.execute(
            select(outbox)
            .where(
                outbox.c.message_id.in_([UUID(m) for m in message_ids]),
                outbox.c.topic.in_(sorted(topics)),
            )
            .order_by(outbox.c.time, outbox.c.seq)
        ).all()
    return [(row.topic, stored(row)) for row in rows]
