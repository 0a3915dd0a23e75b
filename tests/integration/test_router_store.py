"""The SQL directory: applying decisions on PostgreSQL and SQLite, replay, guards."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, event, select

import router.store as store_module
from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    DeadLetter,
    Flags,
    IdentityKind,
    InboundMessage,
    MessageDuplicate,
    MessageRouted,
    Recipient,
    RecipientRole,
    Thread,
)
from router.decide import RoutingConfig, Team
from router.store import RouterStore, UnknownContact, UnknownOwner, topic_of
from router.tables import inboxes, owners
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import TYPE_DEADLETTER, TYPE_DUPLICATE, TYPE_ROUTED, Event
from switchboard.ids import uuid7
from switchboard.topics import CONTACTS, DEADLETTER, ROUTED
from tests.factories import inbound_message
from tests.router_helpers import CONFIG, snapshot, store_for

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=BaseModel)

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_schema_url")
    else:
        url = f"sqlite:///{tmp_path / 'router.db'}"
    engine = make_engine(url, sqlite_immediate=True)
    upgrade(engine)
    yield engine
    engine.dispose()


def inbox(value: str, role: RecipientRole = RecipientRole.TO) -> Recipient:
    kind = IdentityKind.PHONE if value.startswith("+") else IdentityKind.EMAIL
    return Recipient(kind=kind, value=value, role=role)


def email(sender: str, mid: str | None = None, **fields: object) -> InboundMessage:
    mid = mid or f"{uuid.uuid4().hex}@mail.example.org"
    values: dict[str, object] = {
        "id": uuid7(),
        "sender": email_identity(sender),
        "identities": (),
        "recipients": (inbox("support@example.com"),),
        "received_at": NOW,
        "thread": Thread(message_id=mid),
        "dedupe_key": f"email-mid:{mid}",
    }
    values.update(fields)
    return inbound_message(**values)


def sms(number: str, sid: str | None = None) -> InboundMessage:
    sid = sid or f"SM{uuid.uuid4().hex}"
    return inbound_message(
        id=uuid7(),
        channel="sms",
        adapter="twilio",
        sender=verified(phone_identity(number), "twilio-signature"),
        identities=(),
        recipients=(inbox("+14155550199"),),
        received_at=NOW,
        subject=None,
        thread=Thread(),
        attachments=(),
        raw=None,
        provider_message_id=sid,
        dedupe_key=f"twilio:{sid}",
    )


def form(mail: str, number: str, *, vouched: bool = True) -> InboundMessage:
    """A form post; ``vouched``: from the company's signed backend, which vouches
    for both identities; else a public form, whose identities are claimed."""
    sender, phone = email_identity(mail), phone_identity(number)
    if vouched:
        sender, phone = verified(sender, "hook:contact-form"), verified(phone, "hook:contact-form")
    return inbound_message(
        id=uuid7(),
        channel="webhook",
        adapter="contact-form",
        sender=sender,
        identities=(phone,),
        recipients=(),
        received_at=NOW,
        thread=Thread(),
        attachments=(),
        raw=None,
        dedupe_key=f"webhook:contact-form:{uuid.uuid4().hex}",
    )


MODELS: dict[str, type[BaseModel]] = {
    TYPE_ROUTED: MessageRouted,
    TYPE_DUPLICATE: MessageDuplicate,
    TYPE_DEADLETTER: DeadLetter,
}


def models(events: Iterable[Event], model: type[M]) -> list[M]:
    """The events' data of one model (contact events: every other type)."""
    return [
        model.model_validate_json(e.value())
        for e in events
        if MODELS.get(e.type, ContactEvent) is model
    ]


def test_one_person_over_three_channels_is_one_contact_owner_and_conversation(
    engine: Engine,
) -> None:
    store = store_for(engine)
    store.sync_owners()
    first = form("ann@example.org", "+14155550100")
    second = sms("+14155550100")
    third = email("ann@example.org")
    outcomes = store.route_batch([first, second]) + store.route_batch([third])
    assert [o.result for o in outcomes] == ["routed", "routed", "routed"]
    snap = snapshot(engine)
    assert len(snap.contacts) == 1
    (contact_id, (owner, keys)) = next(iter(snap.contacts.items()))
    assert keys == {"email:ann@example.org", "phone:+14155550100"}
    assert owner in CONFIG.teams["support"].agents
    assert len(snap.conversations) == 1
    assert {m[0] for m in snap.messages.values()} == {contact_id}
    routed = [m for o in outcomes for m in models(o.events, MessageRouted)]
    assert [r.reason for r in routed] == ["default", "sticky", "sticky"]
    assert {r.owner for r in routed} == {owner}
    assert routed[0].new_contact
    assert routed[0].new_conversation
    assert not routed[1].new_conversation
    assert not routed[2].new_conversation
    created = models(outcomes[0].events, ContactEvent)
    assert [c.kind for c in created] == ["contact.created"]
    assert created[0].identities == ("email:ann@example.org", "phone:+14155550100")
    # Routed events are keyed by contact and go to the routed topic.
    assert {topic_of(e) for e in outcomes[2].events} == {ROUTED}
    assert {e.key for e in outcomes[2].events} == {str(contact_id)}


def test_a_redelivered_message_replays_the_same_events_byte_for_byte(engine: Engine) -> None:
    store = store_for(engine)
    store.sync_owners()
    message = form("ann@example.org", "+14155550100")
    first = store.route_batch([message])[0]
    again = store.route_batch([message])[0]
    assert again.result == "replayed"
    assert [(e.id, e.type, e.key, e.value(), e.time) for e in again.events] == [
        (e.id, e.type, e.key, e.value(), e.time) for e in first.events
    ]
    assert len(snapshot(engine).messages) == 1


def test_a_second_arrival_is_a_duplicate_with_both_inboxes_recorded(engine: Engine) -> None:
    store = store_for(engine)
    store.sync_owners()
    mid = "same-email@mail.example.org"
    by_smtp = email("ann@example.org", mid, recipients=(inbox("support@example.com"),))
    by_imap = email(
        "ann@example.org",
        mid,
        adapter="imap-sales",
        recipients=(inbox("sales@example.com", RecipientRole.DELIVERED_TO),),
    )
    routed, duplicate = store.route_batch([by_smtp]) + store.route_batch([by_imap])
    assert (routed.result, duplicate.result) == ("routed", "duplicate")
    (event,) = models(duplicate.events, MessageDuplicate)
    assert event.original_message_id == by_smtp.id
    assert event.message_id == by_imap.id
    assert [topic_of(e) for e in duplicate.events] == [ROUTED]
    with engine.connect() as c:
        recorded = set(
            c.execute(select(inboxes.c.inbox).where(inboxes.c.message_id == by_smtp.id)).scalars()
        )
    assert recorded == {"email:support@example.com", "email:sales@example.com"}
    assert len(snapshot(engine).messages) == 1


def test_two_contacts_linked_by_a_form_merge_into_the_older(engine: Engine) -> None:
    store = store_for(engine)
    store.sync_owners()
    older = store.route_batch([email("ann@example.org")])[0]
    store.route_batch([email("other@example.org")])  # moves the round-robin cursor
    newer = store.route_batch([sms("+14155550100")])[0]
    older_id = models(older.events, MessageRouted)[0].contact_id
    newer_routed = models(newer.events, MessageRouted)[0]
    assert newer_routed.contact_id != older_id
    merge = store.route_batch([form("ann@example.org", "+14155550100")])[0]
    routed = models(merge.events, MessageRouted)[0]
    assert routed.contact_id == older_id
    assert routed.reason == "merged"
    assert routed.merged_contact_ids == (newer_routed.contact_id,)
    (merged,) = [e for e in models(merge.events, ContactEvent) if e.kind == "contact.merged"]
    assert merged.contact_id == older_id
    assert merged.merged_contact_ids == (newer_routed.contact_id,)
    assert merged.identities == ("phone:+14155550100",)
    snap = snapshot(engine)
    assert snap.merged == {newer_routed.contact_id: older_id}
    assert snap.contacts[older_id][1] == {"email:ann@example.org", "phone:+14155550100"}
    # The SMS and its conversation moved with it; the owner is the older contact's.
    assert snap.messages[newer_routed.message.id][0] == older_id
    assert snap.conversations[newer_routed.conversation_id] == older_id
    assert routed.owner == models(older.events, MessageRouted)[0].owner
    # A later SMS follows the survivor.
    later = models(store.route_batch([sms("+14155550100")])[0].events, MessageRouted)[0]
    assert (later.contact_id, later.reason) == (older_id, "sticky")


def test_over_merging_is_refused_beyond_the_identity_limit(engine: Engine) -> None:
    config = RoutingConfig(teams=CONFIG.teams, default_team="support", max_identities_per_kind=2)
    store = store_for(engine, config)
    store.sync_owners()
    store.route_batch([form("ann@example.org", "+14155550100")])
    store.route_batch([form("ann@example.org", "+14155550101")])
    third = store.route_batch([form("ann@example.org", "+14155550102")])[0]
    assert third.result == "routed"
    snap = snapshot(engine)
    (_owner, keys) = snap.contacts[snap.contact_of("email:ann@example.org")]  # type: ignore[index]
    assert sorted(k for k in keys if k.startswith("phone:")) == [
        "phone:+14155550100",
        "phone:+14155550101",
    ]
    assert snap.contact_of("phone:+14155550102") is None  # refused, not linked


def test_bounce_attaches_to_the_bounced_message_and_unknown_bounce_is_dead_lettered(
    engine: Engine,
) -> None:
    store = store_for(engine)
    store.sync_owners()
    original = email("ann@example.org", "orig@mail.example.org")
    routed = models(store.route_batch([original])[0].events, MessageRouted)[0]
    bounce = email(
        "mailer-daemon@mx.example.net",
        flags=Flags(bounce=True, bounced_message_id="orig@mail.example.org"),
    )
    unknown = email(
        "mailer-daemon@mx.example.net",
        flags=Flags(bounce=True, bounced_message_id="never-seen@mail.example.org"),
    )
    matched, lost = store.route_batch([bounce, unknown])
    got = models(matched.events, MessageRouted)[0]
    assert (got.contact_id, got.reason) == (routed.contact_id, "bounce")
    assert lost.result == "unroutable"
    (letter,) = models(lost.events, DeadLetter)
    assert letter.reason == "bounce-unmatched"
    assert [topic_of(e) for e in lost.events] == [DEADLETTER]
    assert snapshot(engine).contact_of("email:mailer-daemon@mx.example.net") is None


def test_an_owner_removed_from_the_config_is_replaced_within_the_team(engine: Engine) -> None:
    store = store_for(engine)
    store.sync_owners()
    first = models(store.route_batch([email("ann@example.org")])[0].events, MessageRouted)[0]
    remaining = tuple(a for a in CONFIG.teams["support"].agents if a != first.owner)
    smaller = RoutingConfig(
        teams={"support": Team("support", remaining)},
        default_team="support",
        blocked_identities=CONFIG.blocked_identities,
    )
    store = store_for(engine, smaller)
    store.sync_owners()
    outcome = store.route_batch([email("ann@example.org")])[0]
    routed = models(outcome.events, MessageRouted)[0]
    assert routed.reason == "owner-removed"
    assert routed.owner in remaining
    (assigned,) = models(outcome.events, ContactEvent)
    assert (assigned.kind, assigned.previous_owner, assigned.owner) == (
        "owner.assigned",
        first.owner,
        routed.owner,
    )


def test_manual_assignment_is_sticky_and_recorded_as_pending(engine: Engine) -> None:
    store = store_for(engine)
    store.sync_owners()
    first = models(store.route_batch([email("ann@example.org")])[0].events, MessageRouted)[0]
    target = next(a for a in CONFIG.teams["support"].agents if a != first.owner)
    event = store.assign(first.contact_id, target, by="dana")
    assert topic_of(event) == CONTACTS
    assert [e.id for e in store.pending()] == [event.id]
    data = json.loads(event.value())
    assert (data["owner"], data["previous_owner"], data["reason"], data["by"]) == (
        target,
        first.owner,
        "manual",
        "dana",
    )
    store.mark_published([event.id])
    assert store.pending() == []
    later = models(store.route_batch([email("ann@example.org")])[0].events, MessageRouted)[0]
    assert (later.owner, later.reason) == (target, "sticky")
    with pytest.raises(UnknownOwner):
        store.assign(first.contact_id, "mallory")
    with pytest.raises(UnknownContact):
        store.assign(uuid.uuid4(), target)


def _poisoned(monkeypatch: pytest.MonkeyPatch, poison: InboundMessage) -> list[uuid.UUID]:
    """Routing fails on ``poison`` (a bug, not an outage); returns the ids of every
    message routing was asked to decide, in order."""
    real_route = store_module.route  # type: ignore[attr-defined]
    calls: list[uuid.UUID] = []

    def flaky(message: InboundMessage, *args: object) -> object:
        calls.append(message.id)
        if message.id == poison.id:
            raise RuntimeError("a bug in routing")
        return real_route(message, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "route", flaky)
    return calls


def test_a_message_that_keeps_failing_is_dead_lettered_and_the_batch_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_for(engine)
    store.sync_owners()
    poison = email("poison@example.org")
    fine = email("fine@example.org")
    calls = _poisoned(monkeypatch, poison)
    failed, routed = store.route_batch([poison, fine])
    # Once in the batch's fast path, then max_attempts times on its own.
    assert calls.count(poison.id) == store.max_attempts + 1
    assert (failed.result, routed.result) == ("failed", "routed")
    (letter,) = models(failed.events, DeadLetter)
    assert letter.reason == "routing-failed"
    assert "a bug in routing" in letter.detail
    assert letter.source_event_id == str(poison.id)
    # Redelivery does not try again: the dead letter is replayed.
    again = store.route_batch([poison])[0]
    assert again.result == "replayed"
    assert [e.id for e in again.events] == [e.id for e in failed.events]
    assert snapshot(engine).contact_of("email:poison@example.org") is None


def test_one_failing_message_in_a_large_poll_is_found_by_halving(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed poll is retried in halves, not message by message: the bad message
    is tried once per halving, the others are routed in a few savepoints."""
    store = store_for(engine)
    store.sync_owners()
    poll = [email(f"person{i}@example.org") for i in range(64)]
    poison = poll[41]
    calls = _poisoned(monkeypatch, poison)
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        outcomes = store.route_batch(poll)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert [o.message_id for o in outcomes] == [m.id for m in poll]
    assert [o.result for o in outcomes].count("failed") == 1
    assert outcomes[41].result == "failed"
    assert all(o.result == "routed" for i, o in enumerate(outcomes) if i != 41)
    # The whole poll, then halves of 32, 16, 8, 4, 2, then max_attempts alone.
    assert calls.count(poison.id) == 1 + 5 + store.max_attempts
    # Message by message (each in a savepoint with its own reads and writes) took
    # 599 statements on SQLite and 911 on PostgreSQL; halving 121 and 143.
    assert len(statements) < 250
    routed = snapshot(engine)
    assert routed.contact_of("email:person40@example.org") is not None
    assert routed.contact_of("email:person41@example.org") is None


def test_dedupe_keys_expire_after_the_retention(engine: Engine) -> None:
    later_on = [datetime.now(UTC)]
    store = RouterStore(engine, CONFIG, retention=timedelta(days=1), clock=lambda: later_on[0])
    store.sync_owners()
    first = email("ann@example.org", "kept@mail.example.org")
    store.route_batch([first])
    assert store.purge()[0] == 0  # within the retention
    later_on[0] += timedelta(days=1, seconds=1)
    assert store.purge()[0] == 1
    later = email("ann@example.org", "kept@mail.example.org")
    assert store.route_batch([later])[0].result == "routed"


def test_routers_starting_together_sync_the_owners_without_a_conflict(
    postgres_schema_url: str,
) -> None:
    engines = [make_engine(postgres_schema_url) for _ in range(6)]
    try:
        upgrade(engines[0])
        barrier = threading.Barrier(len(engines))

        def start(engine: Engine) -> None:
            store = store_for(engine)
            with engine.connect() as c:  # connected before the race, as running routers are
                c.execute(select(1))
            barrier.wait()
            store.sync_owners()

        with ThreadPoolExecutor(len(engines)) as pool:
            for future in [pool.submit(start, e) for e in engines]:
                future.result()
        with engines[0].connect() as c:
            names = sorted(c.execute(select(owners.c.name)).scalars())
        assert names == ["alice", "bob", "carol", "support"]
    finally:
        for engine in engines:
            engine.dispose()


def test_a_public_form_suggests_the_merge_instead_of_making_it(engine: Engine) -> None:
    """The takeover by web form: Wendy's email and Vic's phone in one anonymous post.
    Nothing moves; the router emits merge.suggested for an agent."""
    store = store_for(engine)
    store.sync_owners()
    store.route_batch([email("wendy@example.org")])
    store.route_batch([sms("+14155550100")])
    before = snapshot(engine)
    outcome = store.route_batch([form("wendy@example.org", "+14155550100", vouched=False)])[0]
    after = snapshot(engine)
    assert after.merged == {}
    assert after.contacts == before.contacts
    wendy = after.contact_of("email:wendy@example.org")
    vic = after.contact_of("phone:+14155550100")
    assert wendy != vic
    (suggestion,) = [
        e
        for e in models(outcome.events, ContactEvent)
        if e.kind == ContactEventKind.MERGE_SUGGESTED
    ]
    assert (suggestion.contact_id, suggestion.other_contact_id) == (wendy, vic)
    assert suggestion.identities == ("phone:+14155550100",)
    assert suggestion.message_id == outcome.message_id
    # Vic's next SMS lands in Vic's own contact.
    next_sms = store.route_batch([sms("+14155550100")])[0]
    (routed,) = models(next_sms.events, MessageRouted)
    assert routed.contact_id == vic


def test_contact_events_carry_the_name_the_sender_presented(engine: Engine) -> None:
    store = store_for(engine)
    first = email("ann@example.org").model_copy(
        update={"sender": email_identity("ann@example.org", "Ann Example")}
    )
    created = models(store.route_batch([first])[0].events, ContactEvent)
    assert [(e.kind, e.display_name) for e in created] == [
        (ContactEventKind.CREATED, "Ann Example")
    ]
    # A form vouched for by the company's backend links her phone, under her new name.
    linked_by = email(
        "ann@example.org", identities=(verified(phone_identity("+14155550177"), "hook:crm"),)
    ).model_copy(
        update={"sender": verified(email_identity("ann@example.org", "Ann B. Example"), "hook:crm")}
    )
    linked = models(store.route_batch([linked_by])[0].events, ContactEvent)
    assert [(e.kind, e.display_name) for e in linked] == [
        (ContactEventKind.IDENTITY_LINKED, "Ann B. Example")
    ]
    # An SMS presents no name: nothing is said about one.
    assert (
        models(store.route_batch([sms("+14155550123")])[0].events, ContactEvent)[0].display_name
        is None
    )


def test_a_payload_fingerprint_dedupes_retries_not_a_repeat_days_later(engine: Engine) -> None:
    """A hook post without a key or id is deduplicated by its payload's fingerprint
    for an hour (a sender's retries); the same words posted again later are a new
    message. A key or id the sender chose dedupes for the whole retention."""
    now = [datetime.now(UTC)]
    store = RouterStore(engine, CONFIG, retention=timedelta(days=30), clock=lambda: now[0])
    store.sync_owners()

    def post(key: str) -> str:
        message = form("ann@example.org", "+14155550100", vouched=False)
        return store.route_batch([message.revised(dedupe_key=key)])[0].result

    fingerprint = "webhook:contact-form:fp:" + "ab" * 20
    chosen = "webhook:contact-form:email:ann@example.org:id:42"
    assert (post(fingerprint), post(chosen)) == ("routed", "routed")
    now[0] += timedelta(minutes=59)
    assert (post(fingerprint), post(chosen)) == ("duplicate", "duplicate")
    now[0] += timedelta(days=2)
    assert (post(fingerprint), post(chosen)) == ("routed", "duplicate")
