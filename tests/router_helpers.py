"""Run the router against a real broker and database, and read what it decided."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import Engine, func, select

from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import Identity, InboundMessage
from router.decide import RoutingConfig, Team
from router.service import Router
from router.store import RouterStore
from router.tables import contacts, conversations, identities, messages, outbox
from switchboard.broker import EmbeddedBroker
from switchboard.events import TYPE_INBOUND, Event, read_data, read_meta
from switchboard.ids import uuid7
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
        convs = {}
        for row in c.execute(
            select(conversations.c.id, conversations.c.contact_id, conversations.c.owner)
        ):
            convs[row.id] = row.contact_id
            # Every snapshot checks the copy of the owner each conversation carries
            # (what least-loaded teams count): a conversation of a live contact, with
            # its owner.
            assert row.contact_id in live, f"conversation {row.id} of a merged contact"
            assert row.owner == live[row.contact_id][0], f"conversation {row.id}: stale owner"
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
    distinct: Callable[[M], object] | None = None,
) -> list[M]:
    """The data of events of one CloudEvents type on a topic: waits for ``count``
    of them (or ``count`` distinct values of ``distinct``)."""
    found: list[M] = []
    consumer = make_consumer(kafka, group_id=f"{group}-{type_}", topics=[topic])
    deadline = time.monotonic() + timeout_s

    def enough() -> bool:
        seen = len({distinct(f) for f in found}) if distinct else len(found)
        return seen >= count

    try:
        while not enough() and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS).values():
                for record in batch:
                    if read_meta(record.headers).type == type_:
                        found.append(read_data(record.value, model))
    finally:
        consumer.close()
    return found


@dataclass(frozen=True)
class Population:
    """Messages from people who each write from 2 or 3 identities."""

    messages: list[InboundMessage]  # in publishing order, repeats included
    people: list[frozenset[str]]  # each person's identity keys

    @property
    def dedupe_keys(self) -> set[str]:
        return {m.dedupe_key for m in self.messages}

    @property
    def ids(self) -> set[UUID]:
        return {m.id for m in self.messages}


def population(
    people: int, per_person: int = 8, *, seed: int = 1, repeat: float = 0.1
) -> Population:
    """Each person sends ``per_person`` messages from random identities of theirs,
    one of them a form carrying all of them (which links them, merging contacts
    created meanwhile), in a random global order. A ``repeat`` share arrives a
    second time under a new message id (same dedupe key, as SMTP + IMAP would),
    and 2% are published twice as the very same event (a producer retry)."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=1)
    messages: list[InboundMessage] = []
    everyone: list[frozenset[str]] = []
    for p in range(people):
        # Verified, as DMARC-passing mail, signed SMS and a vouching hook are: these
        # populations exercise linking and merging under load.
        ids = [
            verified(email_identity(f"person{p}@example.org"), "test"),
            verified(phone_identity(f"+1415{2000000 + p:07d}"), "test"),
        ]
        if rng.random() < 0.5:
            ids.append(verified(email_identity(f"p{p}@work.example.com"), "test"))
        everyone.append(frozenset(i.key for i in ids))
        form_at = rng.randrange(per_person)
        for n in range(per_person):
            received = start + timedelta(seconds=rng.uniform(0, 3000))
            if n == form_at:
                messages.append(
                    _message("webhook", ids[0], f"webhook:form:{p}-{n}", received, tuple(ids[1:]))
                )
                continue
            sender = rng.choice(ids)
            if sender.kind == "phone":
                messages.append(_message("sms", sender, f"twilio:SM{p:06d}{n:04d}", received))
            else:
                messages.append(
                    _message("email", sender, f"email-mid:{p}.{n}@example.org", received)
                )
    rng.shuffle(messages)
    repeats = [
        m.model_copy(update={"id": uuid7()})
        for m in rng.sample(messages, int(len(messages) * repeat))
    ]
    same_event = rng.sample(messages, int(len(messages) * 0.02))
    for extra in repeats + same_event:
        messages.insert(rng.randrange(len(messages) + 1), extra)
    return Population(messages, everyone)


def _message(
    channel: str,
    sender: Identity,
    dedupe_key: str,
    received: datetime,
    extra: tuple[Identity, ...] = (),
) -> InboundMessage:
    return InboundMessage(
        id=uuid7(),
        channel=channel,
        adapter={"sms": "twilio", "email": "smtp"}.get(channel, "contact-form"),
        received_at=received,
        sender=sender,
        identities=extra,
        subject="Order" if channel == "email" else None,
        text="Where is my order?",
        dedupe_key=dedupe_key,
    )


def check_population(snap: Snapshot, pop: Population, agents: Iterable[str]) -> None:
    """Exactly one contact per person with all their identities, one configured
    owner each, every message once, nothing lost."""
    by_key = {key: c for c, (_, keys) in snap.contacts.items() for key in keys}
    contact_of_person = []
    for keys in pop.people:
        found = {by_key.get(k) for k in keys}
        assert len(found) == 1, f"person {sorted(keys)} is spread over {found}"
        (contact,) = found
        assert contact is not None
        assert snap.contacts[contact][1] == keys
        contact_of_person.append(contact)
    assert len(set(contact_of_person)) == len(pop.people), "two people share a contact"
    assert len(snap.contacts) == len(pop.people), "contacts that belong to no person"
    assert {owner for owner, _ in snap.contacts.values()} <= set(agents)
    dedupe = sorted(key for _, _, key in snap.messages.values())
    assert len(dedupe) == len(set(dedupe)), "a message stored twice"
    assert set(dedupe) == pop.dedupe_keys, "a message lost"
    for message_id, (contact, conversation, _) in snap.messages.items():
        assert snap.conversations[conversation] == contact, message_id


def survivor_of(engine: Engine, contact_id: UUID) -> UUID | None:
    """The contact a contact id stands for now (itself unless merged), None if unknown."""
    with engine.connect() as c:
        row = c.execute(
            select(contacts.c.id, contacts.c.merged_into).where(contacts.c.id == contact_id)
        ).first()
    return None if row is None else UUID(str(row.merged_into or row.id))
