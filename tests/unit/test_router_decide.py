"""router/decide.py: every routing rule on the pure code, with an in-memory directory."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from normalize.identity import email_identity, external_identity, phone_identity, verified
from normalize.schema import (
    Flags,
    Identity,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    Thread,
)
from router.decide import (
    ContactView,
    ConversationView,
    Duplicate,
    Routed,
    RoutingConfig,
    Rule,
    SeenMessage,
    Team,
    Unroutable,
    derived_id,
    route,
)
from router.directory import is_content_fingerprint
from switchboard.ids import uuid7
from tests.factories import inbound_message

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CONFIG = RoutingConfig(
    teams={
        "support": Team("support", ("alice", "bob")),
        "sales": Team("sales", ("sam", "sue"), assignment="least-loaded", capacity=2),
    },
    default_team="support",
    rules=(
        Rule("sales-inbox", team="sales", inbox="email:sales@acme.example.com"),
        Rule("pricing", team="sales", keywords=("quote", "pricing")),
    ),
    blocked_identities=frozenset({"email:support@acme.example.com"}),
    max_identities_per_kind=3,
)


@dataclass
class FakeDirectory:
    messages: dict[str, SeenMessage] = field(default_factory=dict)
    email_ids: dict[str, SeenMessage] = field(default_factory=dict)
    contacts: dict[str, ContactView] = field(default_factory=dict)
    conversations: list[tuple[ConversationView, tuple[str, ...]]] = field(default_factory=list)
    load: dict[str, int] = field(default_factory=dict)
    cursor: dict[str, int] = field(default_factory=dict)

    def seen(self, dedupe_key: str) -> SeenMessage | None:
        return self.messages.get(dedupe_key)

    def contacts_for(self, keys: Sequence[str]) -> Mapping[str, ContactView]:
        return {k: self.contacts[k] for k in keys if k in self.contacts}

    def message_by_email_id(self, email_message_id: str) -> SeenMessage | None:
        return self.email_ids.get(email_message_id)

    def contact(self, contact_id: UUID) -> ContactView | None:
        return next((c for c in self.contacts.values() if c.id == contact_id), None)

    def conversation_for_thread(
        self, contact_id: UUID, email_ids: Sequence[str]
    ) -> ConversationView | None:
        return next(
            (
                c
                for c, ids in self.conversations
                if c.contact_id == contact_id and set(ids) & set(email_ids)
            ),
            None,
        )

    def latest_conversation(self, contact_id: UUID) -> ConversationView | None:
        mine = [c for c, _ in self.conversations if c.contact_id == contact_id]
        return max(mine, key=lambda c: c.last_message_at) if mine else None

    def open_load(self, agents: Sequence[str]) -> Mapping[str, int]:
        return {a: self.load.get(a, 0) for a in agents}

    def round_robin_next(self, team: str) -> int:
        return self.cursor.get(team, 0)

    def add_contact(self, *keys: str, owner: str = "alice", age_days: int = 1) -> ContactView:
        contact = ContactView(uuid.uuid4(), NOW - timedelta(days=age_days), owner, frozenset(keys))
        for key in keys:
            self.contacts[key] = contact
        return contact


def email(sender: str | Identity = "ann@example.com", **overrides: object) -> InboundMessage:
    fields: dict[str, object] = {
        "id": uuid7(),
        "sender": email_identity(sender) if isinstance(sender, str) else sender,
        "identities": (),
        "received_at": NOW,
        "dedupe_key": f"email-mid:{uuid.uuid4()}@example.com",
        "thread": Thread(),
        "recipients": (
            Recipient(
                kind=IdentityKind.EMAIL, value="support@acme.example.com", role=RecipientRole.TO
            ),
        ),
    }
    fields.update(overrides)
    return inbound_message(**fields)


def text_message(sid: str, number: str = "+14155550100") -> InboundMessage:
    return inbound_message(
        id=uuid7(),
        channel="sms",
        sender=phone_identity(number),
        identities=(),
        recipients=(),
        received_at=NOW,
        dedupe_key=f"twilio:{sid}",
    )


def routed(decision: object) -> Routed:
    assert isinstance(decision, Routed), decision
    return decision


def test_a_new_person_gets_a_new_contact_and_an_owner_by_round_robin() -> None:
    view = FakeDirectory(cursor={"support": 1})
    message = email()
    d = routed(route(message, view, CONFIG))
    assert d.new_contact
    assert d.contact_id == derived_id(message.id, "contact")
    assert d.link == ("email:ann@example.com",)
    assert (d.owner, d.reason, d.assign_cursor) == ("bob", "default", "support")
    assert d.new_conversation
    assert d.event_id == derived_id(message.id, "routed")


def test_decisions_are_deterministic_for_a_redelivered_message() -> None:
    message = email()
    assert route(message, FakeDirectory(), CONFIG) == route(message, FakeDirectory(), CONFIG)


def test_duplicates_and_redeliveries() -> None:
    first = email()
    view = FakeDirectory()
    view.messages[first.dedupe_key] = SeenMessage(first.id, uuid.uuid4(), uuid.uuid4())
    again = route(first, view, CONFIG)
    assert isinstance(again, Duplicate)
    assert again.redelivery is True
    via_imap = first.model_copy(update={"id": uuid7(), "adapter": "imap:support"})
    second = route(via_imap, view, CONFIG)
    assert isinstance(second, Duplicate)
    assert second.redelivery is False
    assert second.original.message_id == first.id


def test_rules_pick_the_team_first_match_wins() -> None:
    to_sales = email(
        recipients=(
            Recipient(
                kind=IdentityKind.EMAIL, value="sales@acme.example.com", role=RecipientRole.ENVELOPE
            ),
        )
    )
    d = routed(route(to_sales, FakeDirectory(load={"sam": 1, "sue": 0}), CONFIG))
    assert (d.owner, d.reason) == ("sue", "rule:sales-inbox")  # least-loaded
    pricing = email(subject="Need a QUOTE")
    assert routed(route(pricing, FakeDirectory(), CONFIG)).reason == "rule:pricing"


def test_capacity_full_falls_back_to_the_team() -> None:
    full = FakeDirectory(load={"sam": 2, "sue": 5})
    d = routed(route(email(subject="pricing please"), full, CONFIG))
    assert d.owner == "sales"


def test_owner_is_sticky_across_channels() -> None:
    view = FakeDirectory()
    contact = view.add_contact("email:ann@example.com", "phone:+14155550100", owner="bob")
    sms = text_message("SM1")
    d = routed(route(sms, view, CONFIG))
    assert (d.contact_id, d.owner, d.reason, d.owner_changed) == (
        contact.id,
        "bob",
        "sticky",
        False,
    )


def test_a_removed_owner_is_replaced_within_the_team() -> None:
    view = FakeDirectory()
    view.add_contact("email:ann@example.com", owner="carol-left")
    d = routed(route(email(), view, CONFIG))
    assert (d.reason, d.owner_changed) == ("owner-removed", True)
    assert d.owner in ("alice", "bob")


def vouched(identity: Identity) -> Identity:
    return verified(identity, "hook:backend")


def test_a_form_linking_two_contacts_merges_into_the_older() -> None:
    view = FakeDirectory()
    old = view.add_contact("email:ann@example.com", owner="alice", age_days=30)
    young = view.add_contact("phone:+14155550100", owner="bob", age_days=1)
    form = email(
        sender=vouched(email_identity("ann@example.com")),
        identities=(vouched(phone_identity("+14155550100")),),
        channel="webhook",
    )
    d = routed(route(form, view, CONFIG))
    assert (d.contact_id, d.merged, d.owner, d.reason) == (old.id, (young.id,), "alice", "merged")
    assert d.link == ()


def test_over_merging_is_refused_beyond_the_identity_limit() -> None:
    view = FakeDirectory()
    mine = view.add_contact("email:ann@example.com", owner="alice")
    view.add_contact(
        "email:a@x.example.com",
        "email:b@x.example.com",
        "email:c@x.example.com",
        owner="bob",
        age_days=40,
    )
    form = email(
        sender=vouched(email_identity("ann@example.com")),
        identities=(vouched(email_identity("a@x.example.com")),),
    )
    d = routed(route(form, view, CONFIG))
    assert d.merged == ()
    assert d.contact_id == mine.id
    assert d.refused == ("email:a@x.example.com",)


def test_linking_beyond_the_limit_is_refused() -> None:
    view = FakeDirectory()
    view.add_contact("email:ann@example.com", "email:b@example.com", "email:c@example.com")
    form = email(
        sender=vouched(email_identity("ann@example.com")),
        identities=(
            vouched(email_identity("d@example.com")),
            vouched(phone_identity("+14155550100")),
        ),
    )
    d = routed(route(form, view, CONFIG))
    assert d.refused == ("email:d@example.com",)
    assert d.link == ("phone:+14155550100",)


def test_blocked_and_machine_identities_are_never_used() -> None:
    view = FakeDirectory()
    ours = email(sender="support@acme.example.com")
    assert isinstance(route(ours, view, CONFIG), Unroutable)
    noreply = email(
        sender="no-reply@shop.example.com", identities=(email_identity("ann@example.com"),)
    )
    assert routed(route(noreply, view, CONFIG)).link == ("email:ann@example.com",)


def test_a_bounce_attaches_to_the_bounced_messages_contact() -> None:
    view = FakeDirectory()
    contact = view.add_contact("email:ann@example.com", owner="bob")
    view.email_ids["reply-1@acme.example.com"] = SeenMessage(uuid.uuid4(), contact.id, uuid.uuid4())
    bounce = email(
        sender="mailer-daemon@mx.example.net",
        flags=Flags(bounce=True, bounced_message_id="reply-1@acme.example.com"),
    )
    d = routed(route(bounce, view, CONFIG))
    assert (d.contact_id, d.owner, d.reason, d.link) == (contact.id, "bob", "bounce", ())
    unknown = email(
        sender="mailer-daemon@mx.example.net",
        flags=Flags(bounce=True, bounced_message_id="nobody@x"),
    )
    decision = route(unknown, view, CONFIG)
    assert isinstance(decision, Unroutable)
    assert decision.reason == "bounce-unmatched"


def test_an_auto_reply_from_a_stranger_assigns_no_agent() -> None:
    d = routed(route(email(flags=Flags(auto_reply=True)), FakeDirectory(), CONFIG))
    assert (d.owner, d.reason, d.assign_cursor) == ("support", "auto-reply", None)


def test_replies_join_their_thread_only_within_the_contact() -> None:
    view = FakeDirectory()
    ann = view.add_contact("email:ann@example.com")
    other = view.add_contact("email:eve@example.com")
    ann_thread = ConversationView(uuid.uuid4(), ann.id, NOW - timedelta(days=30))
    eve_thread = ConversationView(uuid.uuid4(), other.id, NOW - timedelta(hours=1))
    view.conversations += [(ann_thread, ("t1@acme",)), (eve_thread, ("t2@acme",))]
    reply = email(thread=Thread(in_reply_to=("t1@acme",)))
    assert routed(route(reply, view, CONFIG)).conversation_id == ann_thread.id
    # Eve quotes Ann's thread: it does not land in Ann's conversation.
    quoting = email(sender="eve@example.com", thread=Thread(references=("t1@acme",)))
    assert routed(route(quoting, view, CONFIG)).conversation_id == eve_thread.id


@pytest.mark.parametrize(("hours", "joins"), [(1, True), (71, True), (73, False)])
def test_idle_window_across_channels(hours: int, joins: bool) -> None:
    view = FakeDirectory()
    ann = view.add_contact("email:ann@example.com", "phone:+14155550100")
    open_conv = ConversationView(uuid.uuid4(), ann.id, NOW - timedelta(hours=hours))
    view.conversations.append((open_conv, ()))
    sms = text_message("SM9")
    d = routed(route(sms, view, CONFIG))
    assert (d.conversation_id == open_conv.id) is joins
    assert d.new_conversation is not joins


# -- who may link and merge (merge_policy) -----------------------------------------


def test_a_strangers_form_never_merges_two_customers() -> None:
    """The takeover: one anonymous post with Wendy's email and Vic's phone."""
    view = FakeDirectory()
    wendy = view.add_contact("email:wendy@example.com", owner="alice", age_days=30)
    vic = view.add_contact("phone:+14155550100", owner="bob", age_days=10)
    form = email(
        sender="wendy@example.com", identities=(phone_identity("+14155550100"),), channel="webhook"
    )
    d = routed(route(form, view, CONFIG))
    assert d.merged == ()
    assert d.contact_id == wendy.id  # the sender's own contact
    assert d.suggestions == ((vic.id, "phone:+14155550100"),)
    assert d.link == ()


def test_an_attackers_own_contact_never_absorbs_a_victim() -> None:
    """Attacker first posts with their address (an older contact), then their
    address plus the victim's phone: the victim's contact must stay whole."""
    view = FakeDirectory()
    attacker = view.add_contact("email:mallory@evil.example", owner="alice", age_days=30)
    victim = view.add_contact("phone:+14155550100", owner="bob", age_days=1)
    form = email(sender="mallory@evil.example", identities=(phone_identity("+14155550100"),))
    d = routed(route(form, view, CONFIG))
    assert (d.contact_id, d.merged, d.link) == (attacker.id, (), ())
    assert d.suggestions == ((victim.id, "phone:+14155550100"),)


def test_a_claimed_identity_never_writes_into_another_customers_contact() -> None:
    """A stranger types a customer's number into a form: a new contact for the
    stranger, the number is not attached to it, and an agent is asked."""
    view = FakeDirectory()
    victim = view.add_contact("phone:+14155550100", owner="bob")
    form = email(sender="mallory@evil.example", identities=(phone_identity("+14155550100"),))
    d = routed(route(form, view, CONFIG))
    assert d.new_contact
    assert d.contact_id != victim.id
    assert d.link == ("email:mallory@evil.example",)
    assert d.suggestions == ((victim.id, "phone:+14155550100"),)


def test_a_new_contact_from_claims_gets_only_the_sender() -> None:
    """Otherwise a stranger could pre-register a customer's address with their own
    phone, and later text into the customer's conversation."""
    form = email(sender="victim@example.com", identities=(phone_identity("+14155550100"),))
    d = routed(route(form, FakeDirectory(), CONFIG))
    assert d.new_contact
    assert d.link == ("email:victim@example.com",)
    assert d.suggestions == ()


def test_one_request_with_ten_identities_merges_nothing() -> None:
    view = FakeDirectory()
    people = [view.add_contact(f"email:p{i}@example.com", owner="alice") for i in range(5)]
    people += [view.add_contact(f"phone:+1415555010{i}", owner="bob") for i in range(5)]
    extra = tuple(email_identity(f"p{i}@example.com") for i in range(1, 5)) + tuple(
        phone_identity(f"+1415555010{i}") for i in range(5)
    )
    form = email(sender="p0@example.com", identities=extra)
    d = routed(route(form, view, CONFIG))
    assert d.merged == ()
    assert d.contact_id == people[0].id
    assert {other for other, _ in d.suggestions} == {p.id for p in people[1:]}


def test_verified_identities_link_and_merge_and_claimed_ones_are_suggested() -> None:
    view = FakeDirectory()
    old = view.add_contact("phone:+14155550100", owner="alice", age_days=30)
    young = view.add_contact("external:crm:42", owner="bob", age_days=2)
    other = view.add_contact("email:someone@example.com", owner="bob", age_days=5)
    form = email(
        sender=vouched(phone_identity("+14155550100")),
        identities=(
            verified(external_identity("crm", "42"), "hook:backend"),
            email_identity("someone@example.com"),  # claimed
            email_identity("new@example.com"),  # claimed, unknown: not linked
            vouched(email_identity("proven@example.com")),  # verified, unknown: linked
        ),
        channel="webhook",
    )
    d = routed(route(form, view, CONFIG))
    assert (d.contact_id, d.merged) == (old.id, (young.id,))
    assert d.link == ("email:proven@example.com",)
    assert d.suggestions == ((other.id, "email:someone@example.com"),)


def test_a_claimed_sender_reaches_its_own_contact() -> None:
    view = FakeDirectory()
    ann = view.add_contact("email:ann@example.com", owner="alice")
    d = routed(route(email(), view, CONFIG))
    assert (d.contact_id, d.new_contact, d.suggestions) == (ann.id, False, ())


def test_manual_policy_merges_nothing_and_suggests_instead() -> None:
    manual = RoutingConfig(**{**CONFIG.__dict__, "merge_policy": "manual"})
    view = FakeDirectory()
    old = view.add_contact("email:ann@example.com", owner="alice", age_days=30)
    young = view.add_contact("phone:+14155550100", owner="bob", age_days=1)
    form = email(
        sender=vouched(email_identity("ann@example.com")),
        identities=(vouched(phone_identity("+14155550100")), vouched(email_identity("x@y.org"))),
    )
    d = routed(route(form, view, manual))
    assert (d.contact_id, d.merged) == (old.id, ())
    assert d.suggestions == ((young.id, "phone:+14155550100"),)
    assert d.link == ("email:x@y.org",)  # a verified identity still links


def test_any_policy_merges_on_claims_as_before() -> None:
    anything = RoutingConfig(**{**CONFIG.__dict__, "merge_policy": "any"})
    view = FakeDirectory()
    old = view.add_contact("email:ann@example.com", owner="alice", age_days=30)
    young = view.add_contact("phone:+14155550100", owner="bob", age_days=1)
    form = email(identities=(phone_identity("+14155550100"), email_identity("x@y.org")))
    d = routed(route(form, view, anything))
    assert (d.contact_id, d.merged, d.suggestions) == (old.id, (young.id,), ())
    assert d.link == ("email:x@y.org",)


def test_a_claimed_sender_does_not_decide_where_verified_identities_link() -> None:
    """A hook vouches for the stranger's phone and carries a customer's address as the
    (claimed) sender: the phone gets a contact of its own, the customer's contact is
    only suggested, so the stranger cannot later text into the customer's conversation."""
    view = FakeDirectory()
    victim = view.add_contact("email:victim@example.com", owner="bob")
    form = email(
        sender="victim@example.com",
        identities=(vouched(phone_identity("+14155550199")),),
        channel="webhook",
    )
    d = routed(route(form, view, CONFIG))
    assert d.new_contact
    assert d.contact_id != victim.id
    assert d.link == ("phone:+14155550199",)
    assert d.suggestions == ((victim.id, "email:victim@example.com"),)


def test_a_claimed_sender_is_not_linked_beside_verified_identities() -> None:
    """The same stranger before the customer ever wrote: the customer's address must
    not join the stranger's new contact, else the customer's first verified mail would
    land there."""
    form = email(
        sender="victim@example.com",
        identities=(vouched(phone_identity("+14155550199")),),
        channel="webhook",
    )
    d = routed(route(form, FakeDirectory(), CONFIG))
    assert d.new_contact
    assert d.link == ("phone:+14155550199",)


def test_over_the_limit_a_claimed_sender_does_not_receive_verified_identities() -> None:
    view = FakeDirectory()
    victim = view.add_contact("email:victim@example.com", owner="bob", age_days=1)
    a = view.add_contact("phone:+14155550101", "phone:+14155550102", owner="alice", age_days=9)
    view.add_contact("phone:+14155550103", "phone:+14155550104", owner="alice", age_days=8)
    form = email(
        sender="victim@example.com",
        identities=(
            vouched(phone_identity("+14155550101")),
            vouched(phone_identity("+14155550103")),
            vouched(phone_identity("+14155550105")),
        ),
        channel="webhook",
    )
    d = routed(route(form, view, CONFIG))
    assert d.contact_id == a.id  # merging a and b exceeds 3 phones: refused, a keeps it
    assert d.merged == ()
    assert d.contact_id != victim.id
    assert d.link == ("phone:+14155550105",)  # the verified new phone joins a, not victim
    assert "email:victim@example.com" in d.refused


def test_only_a_hooks_own_payload_fingerprint_counts_as_one() -> None:
    assert is_content_fingerprint("webhook:form:fp:" + "ab" * 20)
    # An Idempotency-Key the sender chose may hold ":fp:" itself.
    assert not is_content_fingerprint("webhook:form:email:a@example.org:key:x:fp:1")
    assert not is_content_fingerprint("email-fp:abc")
    assert not is_content_fingerprint("twilio:SM" + "a" * 32)
