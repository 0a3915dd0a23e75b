"""The queue read model on PostgreSQL and SQLite: events in awkward orders."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, select

from normalize.identity import email_identity
from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    ConversationStatus,
    Flags,
    IdentityKind,
    MessageDuplicate,
    MessageMove,
    MessageRouted,
    Recipient,
    RecipientRole,
)
from sinks import search
from sinks.queue import BadCursor, QueueStore, q_contacts
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    contact_event_type,
)
from switchboard.ids import uuid7
from tests.factories import inbound_message

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_schema_url")
    else:
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    engine: Engine = make_engine(url)
    upgrade(engine)
    yield QueueStore(engine, {"support": ("alice", "bob")})
    engine.dispose()


def record(event: BaseModel) -> tuple[str, str, bytes]:
    """The event as the sink reads it: (type, id, value)."""
    event_id = str(getattr(event, "event_id"))  # noqa: B009
    if isinstance(event, MessageRouted):
        type_ = TYPE_ROUTED
    elif isinstance(event, MessageDuplicate):
        type_ = TYPE_DUPLICATE
    elif isinstance(event, ConversationStatus):
        type_ = TYPE_CONVERSATION_STATUS
    else:
        assert isinstance(event, ContactEvent)
        type_ = contact_event_type(event.kind)
    return type_, event_id, event.model_dump_json().encode()


def apply(store: QueueStore, event: BaseModel) -> bool:
    return store.apply(*record(event))


def routed(
    contact: uuid.UUID, conversation: uuid.UUID, minutes: int, owner: str = "alice", **m: object
) -> MessageRouted:
    message = inbound_message(
        id=uuid7(),
        received_at=T0 + timedelta(minutes=minutes),
        dedupe_key=f"test:{uuid.uuid4()}",
        **m,
    )
    return MessageRouted(
        event_id=uuid.uuid4(),
        message=message,
        contact_id=contact,
        conversation_id=conversation,
        owner=owner,
        reason="sticky",
        new_contact=False,
        new_conversation=False,
        routed_at=T0 + timedelta(minutes=minutes, seconds=1),
    )


def second_arrival(original: MessageRouted) -> MessageDuplicate:
    """The original message again, delivered to the sales inbox (IMAP)."""
    return MessageDuplicate(
        event_id=uuid.uuid4(),
        message_id=uuid7(),
        original_message_id=original.message.id,
        contact_id=original.contact_id,
        conversation_id=original.conversation_id,
        dedupe_key=original.message.dedupe_key,
        channel="email",
        adapter="imap:sales",
        recipients=(
            Recipient(
                kind=IdentityKind.EMAIL, value="sales@example.com", role=RecipientRole.DELIVERED_TO
            ),
        ),
        received_at=T0,
    )


def contact_event(
    kind: ContactEventKind, contact: uuid.UUID, minutes: int, **f: object
) -> ContactEvent:
    return ContactEvent(
        event_id=uuid.uuid4(),
        kind=kind,
        contact_id=contact,
        occurred_at=T0 + timedelta(minutes=minutes),
        **f,  # type: ignore[arg-type]
    )


def test_the_same_event_twice_changes_nothing(store: QueueStore) -> None:
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    event = routed(contact, conversation, 0)
    assert apply(store, event) is True
    before = store.rows()
    assert apply(store, event) is False
    assert store.rows() == before
    assert store.conversation(conversation)["message_count"] == 1


def test_the_same_event_twice_in_one_poll_is_applied_once(store: QueueStore) -> None:
    """A poll marks its events applied in one statement: an event published twice
    (a producer retry) and read in the same poll counts once, in its first place."""
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    first, second = routed(contact, conversation, 0), routed(contact, conversation, 1)
    records = [
        (TYPE_ROUTED, str(e.event_id), e.model_dump_json().encode()) for e in (first, second, first)
    ]
    assert store.apply_many(records) == [True, True, False]
    assert store.conversation(conversation)["message_count"] == 2
    assert store.apply_many(records[:1]) == [False]
    assert store.conversation(conversation)["message_count"] == 2


def test_an_event_id_in_another_spelling_is_the_same_event(store: QueueStore) -> None:
    """An event id is a UUID, whatever its spelling (upper case, no hyphens): found
    by a review, where the first spelling was marked applied and never applied."""
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    event = routed(contact, conversation, 0)
    body = event.model_dump_json().encode()
    upper = str(event.event_id).upper()
    assert store.apply_many(
        [(TYPE_ROUTED, upper, body), (TYPE_ROUTED, event.event_id.hex, body)]
    ) == [
        True,
        False,
    ]
    assert store.conversation(conversation)["message_count"] == 1
    assert apply(store, event) is False
    assert store.conversation(conversation)["message_count"] == 1


def test_a_message_an_unmerge_moved_into_anothers_conversation_refreshes_both(
    store: QueueStore,
) -> None:
    """A message an unmerge moved to a conversation of another contact lands there;
    the contact that conversation leaves keeps no stale work (found by a review;
    the code before missed it too)."""
    a, b, restored = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    x, y = uuid.uuid4(), uuid.uuid4()
    assert apply(store, routed(a, x, 0))
    assert apply(store, routed(b, y, 1))
    late = routed(b, y, 2)
    move = MessageMove(message_id=late.message.id, conversation_id=x)
    assert apply(
        store,
        contact_event(
            ContactEventKind.UNMERGED, restored, 3, other_contact_id=b, moved_messages=(move,)
        ),
    )
    assert apply(store, late)
    assert store.conversation_contact(x) == b
    with store.engine.connect() as c:
        work = {
            row.id: (row.open_count, row.work)
            for row in c.execute(select(q_contacts).where(q_contacts.c.id.in_([a, b])))
        }
    assert work[a] == (0, None)
    assert work[b] == (2, "open")


def test_an_older_owner_fact_never_overwrites_a_newer_one(store: QueueStore) -> None:
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    apply(store, routed(contact, conversation, 0, owner="alice"))
    apply(store, contact_event(ContactEventKind.OWNER_ASSIGNED, contact, 10, owner="bob"))
    # A message routed (to alice) before the reassignment is delivered late.
    apply(store, routed(contact, conversation, 5, owner="alice"))
    assert store.contact(contact)["owner"] == "bob"
    assert store.conversation(conversation)["owner"] == "bob"
    assert [i["id"] for i in store.queue("bob").items] == [str(conversation)]
    assert store.queue("alice").items == []
    assert [i["id"] for i in store.queue("support").items] == [str(conversation)]


def _merge(survivor: uuid.UUID, merged: uuid.UUID, minutes: int) -> ContactEvent:
    """The router's contact.merged: ``merged``'s phone now belongs to ``survivor``."""
    return contact_event(
        ContactEventKind.MERGED,
        survivor,
        minutes,
        merged_contact_ids=(merged,),
        identities=("phone:+14155550100",),
    )


def test_a_late_message_of_a_merged_contact_lands_on_the_survivor(store: QueueStore) -> None:
    """The routed event was made before the merge (at 3, the merge at 5: a router
    makes no event of a merged contact) and is applied after it (its partition
    lagged)."""
    older, newer = uuid.uuid4(), uuid.uuid4()
    apply(store, routed(older, uuid.uuid4(), 0, owner="alice"))
    apply(store, routed(newer, uuid.uuid4(), 1, owner="bob"))
    apply(store, _merge(older, newer, 5))
    late_conversation = uuid.uuid4()
    apply(store, routed(newer, late_conversation, 3, owner="bob"))
    survivor = store.contact(newer)
    assert survivor["id"] == str(older)
    assert survivor["merged"] is True
    assert survivor["owner"] == "alice"
    assert {c["owner"] for c in survivor["conversations"]} == {"alice"}
    assert str(late_conversation) in {c["id"] for c in survivor["conversations"]}
    assert store.contact_by_identity("phone:+14155550100")["id"] == str(older)


def test_a_merge_applied_before_the_merged_contact_was_seen_still_holds(
    store: QueueStore,
) -> None:
    """Events are keyed by contact id: the merge (on the survivor's partition) can
    be applied before the merged contact's own creation (on its partition). The
    fault suite found the identity then pointing at the merged contact for good."""
    older, newer = uuid.uuid4(), uuid.uuid4()
    apply(store, contact_event(ContactEventKind.CREATED, older, 0, identities=("email:a@x.org",)))
    apply(store, _merge(older, newer, 2))
    late = contact_event(ContactEventKind.CREATED, newer, 1, identities=("phone:+14155550100",))
    apply(store, late)
    apply(store, routed(newer, uuid.uuid4(), 1, owner="bob"))
    assert store.contact_by_identity("phone:+14155550100")["id"] == str(older)
    assert store.contact(newer)["id"] == str(older)
    assert len(store.contact(older)["conversations"]) == 1


@pytest.mark.parametrize("in_order", [True, False])
def test_chained_merges_leave_every_conversation_with_the_survivors_owner(
    store: QueueStore, in_order: bool
) -> None:
    """``low`` merged into ``mid`` (keyed by mid), then mid into ``top`` (keyed by
    top): the sink may apply top's partition first, so the first merge it sees
    moves mid's conversations to top and the second then finds mid merged into
    top. Every conversation ends with top's owner, even when top's next message
    only confirms that owner (a review found low's conversation left in mid's
    owner's queue)."""
    top, mid, low = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ct, cs, cl = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for contact, conversation, owner in ((top, ct, "carol"), (mid, cs, "alice"), (low, cl, "bob")):
        apply(store, contact_event(ContactEventKind.CREATED, contact, 0, owner=owner))
        apply(store, routed(contact, conversation, 0, owner=owner))
    low_into_mid = contact_event(
        ContactEventKind.MERGED, mid, 10, owner="alice", merged_contact_ids=(low,)
    )
    mid_into_top = contact_event(
        ContactEventKind.MERGED, top, 20, owner="carol", merged_contact_ids=(mid,)
    )
    for event in [low_into_mid, mid_into_top] if in_order else [mid_into_top, low_into_mid]:
        apply(store, event)
    apply(store, routed(top, ct, 30, owner="carol"))
    found = store.contact(top)
    assert found["owner"] == "carol"
    assert {c["id"]: c["owner"] for c in found["conversations"]} == {
        str(ct): "carol",
        str(cs): "carol",
        str(cl): "carol",
    }
    assert store.queue("alice").items == store.queue("bob").items == []


def test_a_duplicate_before_its_original_is_harmless(store: QueueStore) -> None:
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    original = routed(contact, conversation, 0)
    duplicate = second_arrival(original)
    apply(store, duplicate)
    apply(store, original)
    assert store.conversation(conversation)["message_count"] == 1
    # Afterwards a second arrival does record its inbox.
    again = duplicate.model_copy(update={"event_id": uuid.uuid4()})
    apply(store, again)
    (message,) = store.conversation(conversation)["messages"]
    assert "email:sales@example.com" in message["inboxes"]


def test_one_poll_writes_its_messages_before_an_event_that_reads_them(
    store: QueueStore,
) -> None:
    """A poll holds its routed messages back and writes them together, before any
    event that reads or moves messages: here a second arrival of a message routed
    earlier in the same poll, a merge that moves it, and a contact created between
    them (which reads none). The message of a replayed routed event keeps its row."""
    older, newer = uuid.uuid4(), uuid.uuid4()
    first = routed(older, uuid.uuid4(), 0, owner="alice")
    original = routed(newer, uuid.uuid4(), 1, owner="bob")
    created = contact_event(ContactEventKind.CREATED, newer, 1, owner="bob")
    duplicate = second_arrival(original)
    merge = _merge(older, newer, 5)
    later = routed(older, first.conversation_id, 6, owner="alice")
    poll = [first, original, created, duplicate, merge, later]
    records = [record(e) for e in poll]
    assert store.apply_many(records) == [True] * len(poll)
    moved = store.conversation(original.conversation_id)
    (message,) = moved["messages"]
    assert "email:sales@example.com" in message["inboxes"]
    assert (moved["contact_id"], moved["owner"]) == (str(older), "alice")
    assert store.conversation(first.conversation_id)["message_count"] == 2
    with store.engine.connect() as c:  # each message indexed once for search
        found = search.for_dialect(c.dialect.name).find(c, "invoice", 10)
    assert sorted(found) == sorted([first.message.id, original.message.id, later.message.id])
    # The same routed event again, under a new id (a rebuild's replay): its message
    # row, inboxes included, is kept as it is.
    replay = original.model_copy(update={"event_id": uuid.uuid4()})
    assert apply(store, replay)
    (message,) = store.conversation(original.conversation_id)["messages"]
    assert "email:sales@example.com" in message["inboxes"]


def test_status_waiting_then_a_customer_message_reopens_and_a_robot_does_not(
    store: QueueStore,
) -> None:
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    apply(store, routed(contact, conversation, 0))
    apply(
        store,
        ConversationStatus(
            event_id=uuid.uuid4(),
            conversation_id=conversation,
            contact_id=contact,
            status="waiting",
            occurred_at=T0 + timedelta(minutes=1),
        ),
    )
    assert store.conversation(conversation)["status"] == "waiting"
    assert store.queue("alice").items == []
    robot = routed(
        contact,
        conversation,
        2,
        sender=email_identity("noreply@example.org"),
        flags={"auto_reply": True},
    )
    apply(store, robot)
    assert store.conversation(conversation)["status"] == "waiting"
    apply(store, routed(contact, conversation, 3))
    reopened = store.conversation(conversation)
    assert reopened["status"] == "open"
    assert reopened["oldest_unanswered_at"] == (T0 + timedelta(minutes=3)).isoformat()


@pytest.mark.parametrize("merge_first", [True, False], ids=["merge-first", "own-events-first"])
def test_a_merged_away_contact_is_the_same_whichever_event_comes_first(
    store: QueueStore, merge_first: bool
) -> None:
    """The merge travels on the survivor's partition, the merged contact's own
    events on its own: a rebuild interleaves them differently from the live run.
    Both orders must give the same rows (a flaky rebuild test found they did not:
    the merged-away row kept its own owner and time in one order only)."""
    older, newer = uuid.uuid4(), uuid.uuid4()
    apply(store, contact_event(ContactEventKind.CREATED, older, 0, owner="alice"))
    apply(store, routed(older, uuid.uuid4(), 0, owner="alice"))
    own = [
        contact_event(
            ContactEventKind.CREATED, newer, 1, owner="carol", identities=("phone:+14155550100",)
        ),
        routed(newer, uuid.uuid4(), 1, owner="carol"),
    ]
    merge = contact_event(
        ContactEventKind.MERGED,
        older,
        5,
        owner="alice",
        merged_contact_ids=(newer,),
        identities=("phone:+14155550100",),
    )
    for event in [merge, *own] if merge_first else [*own, merge]:
        apply(store, event)
    contacts = {row[0]: row for row in store.rows()["queue_contacts"]}

    # (owner, owner_at, merged_into, created_at), times to the second (SQLite keeps
    # no offset): for the merged-away contact, the merge's owner facts, and its own
    # creation (a merge does not change when a contact was created; an unmerge
    # shows it again).
    def facts(row: tuple[str, ...]) -> tuple[str, ...]:
        return (row[1], row[2][:19], row[3], row[4][:19])

    at_merge = str(T0 + timedelta(minutes=5))[:19]
    created = str(T0 + timedelta(minutes=1))[:19]
    assert facts(contacts[str(newer)]) == ("alice", at_merge, str(older), created)
    routed_at = str(T0 + timedelta(seconds=1))[:19]  # its last owner fact: its message
    assert facts(contacts[str(older)]) == ("alice", routed_at, "None", str(T0)[:19])
    assert store.contact(newer)["owner"] == "alice"
    assert {c["owner"] for c in store.contact(older)["conversations"]} == {"alice"}
    assert store.contact_by_identity("phone:+14155550100")["id"] == str(older)


def test_the_queue_pages_in_sql_with_ties_and_closed_conversations(store: QueueStore) -> None:
    """Keyset pagination in SQL: every conversation exactly once, waiting ones first
    (oldest first), then those nobody waits for; ties broken by last activity and
    id; a cursor that was not issued is refused."""
    closed = []
    for n in range(7):
        contact, conversation = uuid.uuid4(), uuid.uuid4()
        # Two conversations wait since the same minute: the tie goes to the id.
        apply(store, routed(contact, conversation, minutes=min(n, 5)))
        if n % 3 == 0:
            status = ConversationStatus(
                event_id=uuid.uuid4(),
                conversation_id=conversation,
                contact_id=contact,
                status="waiting",
                occurred_at=T0 + timedelta(hours=1),
            )
            apply(store, status)
            closed.append(str(conversation))
    seen: list[dict[str, object]] = []
    cursor = None
    while True:
        page = store.queue("alice", status="all", limit=2, cursor=cursor)
        seen.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == 7
    assert len({c["id"] for c in seen}) == 7
    waiting = [c for c in seen if c["oldest_unanswered_at"] is not None]
    assert [c["id"] for c in seen[len(waiting) :]] == sorted(
        closed, key=lambda i: next((c["last_message_at"], i) for c in seen if c["id"] == i)
    )
    keys = [(c["oldest_unanswered_at"], c["last_message_at"], c["id"]) for c in waiting]
    assert keys == sorted(keys)
    assert store.queue("alice", status="open", limit=50).items == [
        c for c in seen if c["status"] == "open"
    ]
    with pytest.raises(BadCursor):
        store.queue("alice", cursor="WyJ4IiwgInkiLCAieiJd")  # ["x", "y", "z"]


def interleavings(*streams: Sequence[BaseModel]) -> Iterator[list[BaseModel]]:
    """Every order the sink can see ``streams`` in: Kafka keeps each key's events
    (each stream) in order, and nothing across keys."""
    if not any(streams):
        yield []
        return
    for i, stream in enumerate(streams):
        if stream:
            rest = (*streams[:i], stream[1:], *streams[i + 1 :])
            for tail in interleavings(*rest):
                yield [stream[0], *tail]


def rows_in_any_order(
    store: QueueStore, *streams: Sequence[BaseModel], orders: int = 24
) -> dict[str, list[tuple[str, ...]]]:
    """The read model after ``streams`` in ``orders`` of the orders the sink can see
    them in (the same sample each run: one stream after another, then a seeded
    draw); fails unless they all give the same rows. Returns them."""
    every = list(interleavings(*streams))
    sample = [every[0], *random.Random(20261130).sample(every[1:], min(orders, len(every)) - 1)]
    expected: dict[str, list[tuple[str, ...]]] | None = None
    for order in sample:
        store.reset()
        for event in order:
            assert apply(store, event)
        found = store.rows()
        if expected is None:
            expected = found
        differ = {
            table: (set(expected[table]) - set(rows), set(rows) - set(expected[table]))
            for table, rows in found.items()
            if rows != expected[table]
        }
        assert not differ, ([type(e).__name__ for e in order], differ)
    assert expected is not None
    assert len(sample) > 1
    return expected


def created(contact: uuid.UUID, *identities: str, owner: str | None = None) -> ContactEvent:
    return contact_event(ContactEventKind.CREATED, contact, 0, owner=owner, identities=identities)


def merged(
    survivor: uuid.UUID, gone: uuid.UUID, minutes: int, *identities: str, owner: str | None = None
) -> ContactEvent:
    """The router's contact.merged, keyed by ``survivor``."""
    return contact_event(
        ContactEventKind.MERGED,
        survivor,
        minutes,
        owner=owner,
        merged_contact_ids=(gone,),
        identities=identities,
    )


def unmerged(restored: uuid.UUID, survivor: uuid.UUID, minutes: int, **f: object) -> ContactEvent:
    """The router's contact.unmerged, keyed by the contact it leaves (``survivor``)."""
    return contact_event(
        ContactEventKind.UNMERGED, restored, minutes, other_contact_id=survivor, **f
    )


def merge_undone(
    survivor: uuid.UUID,
    gone: uuid.UUID,
    minutes: tuple[int, int],
    owners: tuple[str, str],
    back: uuid.UUID,
    moved: MessageRouted,
) -> list[ContactEvent]:
    """The survivor's stream: its creation, ``gone`` merged into it and unmerged at
    ``minutes``, its conversation ``back`` returned with ``moved`` (a message routed
    to the survivor meanwhile) moved into it; ``owners``: the survivor's, gone's."""
    return [
        created(survivor, owner=owners[0]),
        merged(survivor, gone, minutes[0], owner=owners[0]),
        unmerged(
            gone,
            survivor,
            minutes[1],
            owner=owners[1],
            conversation_ids=(back,),
            moved_messages=(MessageMove(message_id=moved.message.id, conversation_id=back),),
        ),
    ]


# Each test below gives its events as streams, one per topic and key: Kafka keeps
# each stream's order and nothing across them (routed events and contact events of
# one contact are on two topics).


def test_an_older_unmerge_applied_after_a_newer_merge_leaves_the_contact_merged(
    store: QueueStore,
) -> None:
    """Carol (c) is merged into Bob (b) at 8, unmerged at 15, and merged into Xena
    (x) at 28. Applied last, the unmerge used to bring carol back to life (a review
    found it); the newer merge stands in every order."""
    b, c, x = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    cb, cc, cx = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    key = "email:carol@example.org"
    rows_in_any_order(
        store,
        [
            created(b, owner="bob"),
            merged(b, c, 8, key, owner="bob"),
            unmerged(c, b, 15, owner="erin", conversation_ids=(cc,), identities=(key,)),
        ],
        [created(c, owner="carol")],
        [created(x, owner="xena"), merged(x, c, 28, key, owner="xena")],
        [routed(b, cb, 0, "bob")],
        [routed(c, cc, 1, "carol")],
        [routed(x, cx, 0, "xena")],
    )
    found = store.contact(c)
    assert (found["id"], found["owner"]) == (str(x), "xena")
    assert {v["id"]: v["owner"] for v in found["conversations"]} == {
        str(cx): "xena",
        str(cc): "xena",
    }
    assert store.contact_by_identity(key)["id"] == str(x)
    assert [v["id"] for v in store.queue("bob").items] == [str(cb)]


def test_a_newer_merge_carries_along_no_identity_an_older_unmerge_gives_back(
    store: QueueStore,
) -> None:
    """c merged into b at 5 and unmerged at 10; b merged into a at 20. Applied
    before the unmerge, the merge at 20 carried c's address along to a and stamped
    it with its own time, so the unmerge lost it (a review found it in this fix)."""
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows_in_any_order(
        store,
        [
            created(b, "email:b@example.org"),
            merged(b, c, 5, "email:c@example.org"),
            unmerged(c, b, 10, identities=("email:c@example.org",)),
        ],
        [created(a), merged(a, b, 20, "email:b@example.org")],
        [created(c)],
    )
    assert store.contact_by_identity("email:c@example.org")["id"] == str(c)
    assert store.contact_by_identity("email:b@example.org")["id"] == str(a)


def test_contacts_merged_into_an_unmerged_contact_follow_it_where_it_lives_on(
    store: QueueStore,
) -> None:
    """e merged into r at 2, r into s at 5, r unmerged at 10 (e follows it), r
    merged into x at 20: e lives on as x, one link away, in every order (a review
    found e left pointing at r's merged-away row)."""
    e, r, s, x = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows_in_any_order(
        store,
        [created(r), merged(r, e, 2)],
        [created(s), merged(s, r, 5), unmerged(r, s, 10, merged_contact_ids=(e,))],
        [created(x), merged(x, r, 20)],
        [created(e)],
    )
    assert store.contact(e)["id"] == store.contact(r)["id"] == str(x)


def test_an_older_unmerge_does_not_take_back_a_contact_a_newer_one_freed(
    store: QueueStore,
) -> None:
    """e merged into r at 2, r into s at 5; r unmerged at 10 (e follows it), e
    unmerged from r at 12: e is itself in every order (a review found the unmerge
    at 10, applied last, merging e into r again)."""
    e, r, s = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows_in_any_order(
        store,
        [created(r), merged(r, e, 2), unmerged(e, r, 12)],
        [created(s), merged(s, r, 5), unmerged(r, s, 10, merged_contact_ids=(e,))],
        [created(e)],
    )
    assert store.contact(e)["id"] == str(e)
    assert store.contact(r)["id"] == str(r)


def test_a_conversation_an_unmerge_fills_before_it_was_seen_counts_all_it_holds(
    store: QueueStore,
) -> None:
    """b merged into a at 10; a message routed to a at 12 is b's, and the unmerge at
    15 moves it to b's conversation, whose own routed event may come after: the row
    it then creates counts both messages (a review found it counting one)."""
    a, b = uuid.uuid4(), uuid.uuid4()
    ca, cb = uuid.uuid4(), uuid.uuid4()
    moved = routed(a, ca, 12, "alice")
    rows_in_any_order(
        store,
        merge_undone(a, b, (10, 15), ("alice", "bob"), cb, moved),
        [routed(a, uuid.uuid4(), 0, "alice"), moved],
        [routed(b, cb, 1, "bob")],
        [created(b, owner="bob")],
    )
    filled = store.conversation(cb)
    assert filled["message_count"] == len(filled["messages"]) == 2
    assert filled["last_message_at"] == filled["messages"][-1]["received_at"]
    emptied = store.conversation(ca)  # by the unmerge
    assert (emptied["message_count"], emptied["messages"]) == (0, [])


def test_a_conversation_an_unmerge_empties_takes_messages_another_unmerge_moves_in(
    store: QueueStore,
) -> None:
    """b merged into a, a's conversation ca gets b's message m1, the unmerge of b
    moves it out; a merged into z, z's message m2 is a's, the unmerge of a moves it
    into ca. ca holds m2 in every order (a review found a version that deleted
    emptied conversations leaving m2 without one in some orders)."""
    a, b, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ca, cb, cz = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    m1, m2 = routed(a, ca, 12, "alice"), routed(z, cz, 22, "zoe")
    rows_in_any_order(
        store,
        merge_undone(a, b, (10, 15), ("alice", "bob"), cb, m1),
        merge_undone(z, a, (20, 25), ("zoe", "alice"), ca, m2),
        [m1],
        [m2],
        [routed(b, cb, 1, "bob")],
        [created(b, owner="bob")],
    )
    held = store.conversation(ca)
    assert [m["id"] for m in held["messages"]] == [str(m2.message.id)]
    assert held["message_count"] == 1
    assert store.conversation(cb)["message_count"] == 2


def test_a_status_set_on_a_conversation_an_unmerge_empties_stays_in_every_order(
    store: QueueStore,
) -> None:
    """An agent closes cb at 13; the unmerge at 15 moves its message on; a robot's
    reply lands in it at 20 (it reopens nothing). cb stays closed in every order
    (a review found a version that deleted emptied conversations reopening it)."""
    b, c = uuid.uuid4(), uuid.uuid4()
    cb, cc = uuid.uuid4(), uuid.uuid4()
    late = routed(b, cb, 11, "bob")
    closed = ConversationStatus(
        event_id=uuid.uuid4(),
        conversation_id=cb,
        contact_id=b,
        status="closed",
        occurred_at=T0 + timedelta(minutes=13),
    )
    robot = routed(b, cb, 20, "bob", flags=Flags(auto_reply=True))
    move = MessageMove(message_id=late.message.id, conversation_id=cc)
    rows_in_any_order(
        store,
        [late, closed, robot],
        [
            created(b, owner="bob"),
            unmerged(c, b, 15, owner="erin", conversation_ids=(cc,), moved_messages=(move,)),
        ],
        [routed(c, cc, 2, "erin")],
        [created(c, owner="erin")],
    )
    found = store.conversation(cb)
    assert (found["status"], found["message_count"]) == ("closed", 1)


def test_a_conversation_an_unmerge_empties_counts_what_it_holds_in_every_order(
    store: QueueStore,
) -> None:
    """An unmerge moves Bob's later message to Erin's conversation; Bob's own older
    message then comes. The emptied conversation used to keep its old summary, so
    it counted two messages while holding one (a review found it)."""
    b, c = uuid.uuid4(), uuid.uuid4()
    cb, cc = uuid.uuid4(), uuid.uuid4()
    late = routed(b, cb, 11, "bob", text="the late one", text_new="the late one")
    move = MessageMove(message_id=late.message.id, conversation_id=cc)
    rows_in_any_order(
        store,
        [late, routed(b, cb, 1, "bob", text="the first one", text_new="the first one")],
        [
            created(b, owner="bob"),
            unmerged(c, b, 15, owner="erin", conversation_ids=(cc,), moved_messages=(move,)),
        ],
        [routed(c, cc, 2, "erin")],
        [created(c, owner="erin")],
    )
    for conversation, count in ((cb, 1), (cc, 2)):
        found = store.conversation(conversation)
        assert found["message_count"] == len(found["messages"]) == count
    assert store.conversation(cb)["started_at"] == store.conversation(cb)["last_message_at"]


def test_a_conversation_an_unmerge_empties_is_nobodys_work(store: QueueStore) -> None:
    """Its only message moved on: it shows no messages, and leaves the owner's
    queue and the contact's work (it kept its old summary, a count of 1 with no
    message)."""
    b, c = uuid.uuid4(), uuid.uuid4()
    cb, cc = uuid.uuid4(), uuid.uuid4()
    only = routed(b, cb, 11, "bob")
    assert apply(store, routed(b, uuid.uuid4(), 0, "bob"))
    assert apply(store, only)
    assert apply(store, routed(c, cc, 2, "erin"))
    move = MessageMove(message_id=only.message.id, conversation_id=cc)
    unmerge = contact_event(
        ContactEventKind.UNMERGED,
        c,
        15,
        owner="erin",
        other_contact_id=b,
        conversation_ids=(cc,),
        moved_messages=(move,),
    )
    assert apply(store, unmerge)
    emptied = store.conversation(cb)
    assert (emptied["message_count"], emptied["messages"]) == (0, [])
    assert str(cb) not in {v["id"] for v in store.queue("bob").items}
    assert len(store.queue("bob").items) == 1
    with store.engine.connect() as conn:
        (open_count,) = conn.execute(
            select(q_contacts.c.open_count).where(q_contacts.c.id == b)
        ).one()
    assert open_count == 1
