"""Run the router against a real broker and database, and read what it decided."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import Engine, func, select

from normalize.schema import InboundMessage
from router.decide import RoutingConfig, Team
from router.service import Router
from router.store import RouterStore, contacts, conversations, identities, messages, outbox
from switchboard.broker import EmbeddedBroker
from switchboard.events import TYPE_INBOUND, Event, read_data, read_meta
from switchboard.kafka import Publisher, make_consumer
from switchboard.settings import MIN_POLL_TIMEOUT_MS, KafkaSettings
from switchboard.topics import INBOUND, ensure_topics

M = TypeVar("M", bound=BaseModel)

CONFIG = RoutingConfig(
    teams={"support": Team("support", ("alice", "bob", "carol"))},
    default_team="support",
    blocked_identities=frozenset({"email:support@example.com", "phone:+14155550199"}),
)


@contextmanager
def fresh_kafka(partitions: int = 3) -> Iterator[KafkaSettings]:
    """A broker of the test's own: no other test's messages on its topics."""
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, partitions=partitions)
        ensure_topics(settings)
        yield settings


def inbound_event(message: InboundMessage) -> Event:
    """The event ingest publishes for a message (see ingest.handoff)."""
    return Event(
        type=TYPE_INBOUND,
        source=f"/switchboard/ingest/{message.adapter}",
        key=message.partition_key,
        data=message,
        subject=str(message.id),
    )


def publish(kafka: KafkaSettings, batch: Sequence[InboundMessage]) -> None:
    publisher = Publisher(kafka)
    try:
        for start in range(0, len(batch), 500):
            chunk = batch[start : start + 500]
            publisher.publish_many([(INBOUND, inbound_event(m)) for m in chunk], timeout_s=30)
    finally:
        publisher.close()


@contextmanager
def running_router(
    kafka: KafkaSettings, store: RouterStore, group: str = "router-test"
) -> Iterator[Router]:
    publisher = Publisher(kafka)
    router = Router(kafka, store, publisher, group_id=group)
    thread = threading.Thread(target=router.run_forever, daemon=True, name="router-test")
    thread.start()
    try:
        yield router
    finally:
        router.request_stop()
        thread.join(20)
        publisher.close(timeout_s=2)


def processed(engine: Engine) -> set[UUID]:
    """Ids of the messages the router has finished (their events are recorded)."""
    with engine.connect() as c:
        return set(
            c.execute(select(outbox.c.message_id).where(outbox.c.message_id.is_not(None)))
            .scalars()
            .all()
        )


def wait_processed(engine: Engine, ids: Iterable[UUID], timeout_s: float = 60) -> float:
    wanted = set(ids)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        missing = wanted - processed(engine)
        if not missing:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{len(missing)} of {len(wanted)} messages not routed in {timeout_s}s")


@dataclass(frozen=True)
class Snapshot:
    """The directory as a support lead would check it."""

    contacts: dict[UUID, tuple[str, frozenset[str]]]  # live contact -> (owner, identity keys)
    merged: dict[UUID, UUID]  # merged contact -> survivor
    messages: dict[UUID, tuple[UUID, UUID, str]]  # message -> (contact, conversation, dedupe key)
    conversations: dict[UUID, UUID]  # conversation -> contact

    def contact_of(self, identity_key: str) -> UUID | None:
        return next((c for c, (_, keys) in self.contacts.items() if identity_key in keys), None)


def snapshot(engine: Engine) -> Snapshot:
    with engine.connect() as c:
        keys: dict[UUID, set[str]] = {}
        for key, contact_id in c.execute(select(identities.c.key, identities.c.contact_id)):
            keys.setdefault(contact_id, set()).add(key)
        live = {}
        merged = {}
        for row in c.execute(select(contacts)):
            if row.merged_into is None:
                live[row.id] = (row.owner, frozenset(keys.get(row.id, set())))
            else:
                merged[row.id] = row.merged_into
        msgs = {
            row.id: (row.contact_id, row.conversation_id, row.dedupe_key)
            for row in c.execute(select(messages))
        }
        convs = {
            row.id: row.contact_id
            for row in c.execute(select(conversations.c.id, conversations.c.contact_id))
        }
    return Snapshot(live, merged, msgs, convs)


def count(engine: Engine, table: object) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def store_for(engine: Engine, config: RoutingConfig = CONFIG) -> RouterStore:
    return RouterStore(engine, config, retention=timedelta(days=30))


def events_of(
    kafka: KafkaSettings,
    topic: str,
    type_: str,
    model: type[M],
    *,
    count: int,
    group: str = "check",
    timeout_s: float = 20,
) -> list[M]:
    """The data of events of one CloudEvents type on a topic (waits for ``count``)."""
    found: list[M] = []
    consumer = make_consumer(kafka, group_id=f"{group}-{type_}", topics=[topic])
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS).values():
                for record in batch:
                    if read_meta(record.headers).type == type_:
                        found.append(read_data(record.value, model))
    finally:
        consumer.close()
    return found
