"""The router's decisions, as pure code: ``route(message, view, config) -> Decision``.

No Kafka, no database: the consumer reads what the view needs inside its
transaction, calls :func:`route`, and applies the decision. Every id the
decision creates is derived from the message id (UUIDv5), so a redelivered
message decides the same contact, conversation and event ids even when the
first attempt crashed before committing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol
from uuid import UUID

from normalize.schema import Assurance, IdentityKind, InboundMessage

_NAMESPACE = uuid.UUID("6f0d4c2e-6a59-5c1c-9a51-7d1f5f1a2b3c")
MACHINE_LOCAL_PARTS = frozenset(
    {"mailer-daemon", "postmaster", "no-reply", "noreply", "do-not-reply", "donotreply"}
)


def derived_id(message_id: UUID, purpose: str) -> UUID:
    """A stable id for something a message creates (contact, conversation, event)."""
    return uuid.uuid5(_NAMESPACE, f"{message_id}:{purpose}")


# -- configuration -------------------------------------------------------------


MergePolicy = Literal["verified", "manual", "any"]


@dataclass(frozen=True)
class Team:
    name: str
    agents: tuple[str, ...]
    assignment: Literal["round-robin", "least-loaded"] = "round-robin"
    capacity: int | None = None  # open conversations per agent; None: unlimited


@dataclass(frozen=True)
class Rule:
    """The first rule whose every given condition matches picks the team."""

    name: str
    team: str
    inbox: str | None = None  # a recipient key: email:sales@example.com, phone:+1...
    channel: str | None = None
    keywords: tuple[str, ...] = ()  # any of them, in subject or text, case-insensitive

    def matches(self, message: InboundMessage) -> bool:
        if self.inbox is not None and self.inbox not in {r.key for r in message.recipients}:
            return False
        if self.channel is not None and message.channel != self.channel:
            return False
        if self.keywords:
            haystack = f"{message.subject or ''}\n{message.text or ''}".lower()
            if not any(k.lower() in haystack for k in self.keywords):
                return False
        return True


@dataclass(frozen=True)
class RoutingConfig:
    teams: Mapping[str, Team]
    default_team: str
    rules: Sequence[Rule] = ()
    blocked_identities: frozenset[str] = frozenset()  # the company's own addresses/numbers
    max_identities_per_kind: int = 10
    idle_window: timedelta = timedelta(hours=72)
    # "verified": only verified identities link and merge; "manual": nothing merges
    # by itself (agents confirm suggestions); "any": every identity links and merges
    # (closed deployments only: a stranger's form can merge two customers).
    merge_policy: MergePolicy = "verified"

    def owner_exists(self, owner: str) -> bool:
        return owner in self.teams or any(owner in t.agents for t in self.teams.values())

    def team_of(self, owner: str) -> str | None:
        if owner in self.teams:
            return owner
        return next((t.name for t in self.teams.values() if owner in t.agents), None)


# -- what the router knows -------------------------------------------------------


@dataclass(frozen=True)
class ContactView:
    id: UUID
    created_at: datetime
    owner: str
    identities: frozenset[str]  # identity keys, e.g. "email:ann@example.com"

    def count(self, kind: IdentityKind) -> int:
        prefix = f"{kind.value}:"
        return sum(1 for key in self.identities if key.startswith(prefix))


@dataclass(frozen=True)
class ConversationView:
    id: UUID
    contact_id: UUID
    last_message_at: datetime


@dataclass(frozen=True)
class SeenMessage:
    message_id: UUID
    contact_id: UUID
    conversation_id: UUID


class DirectoryView(Protocol):
    """Reads the router needs; the SQL directory implements it inside a transaction."""

    def seen(self, dedupe_key: str) -> SeenMessage | None:
        """The first message with this key, within the dedupe retention."""

    def contacts_for(self, keys: Sequence[str]) -> Mapping[str, ContactView]:
        """Identity key -> the (surviving) contact it belongs to, for known keys."""

    def message_by_email_id(self, email_message_id: str) -> SeenMessage | None: ...

    def contact(self, contact_id: UUID) -> ContactView | None:
        """A contact by id, following merges to the survivor."""

    def conversation_for_thread(
        self, contact_id: UUID, email_ids: Sequence[str]
    ) -> ConversationView | None:
        """A conversation of this contact holding one of these email Message-IDs."""

    def latest_conversation(self, contact_id: UUID) -> ConversationView | None: ...

    def open_load(self, agents: Sequence[str]) -> Mapping[str, int]:
        """Open conversations per agent."""

    def round_robin_next(self, team: str) -> int:
        """The team's round-robin cursor (the consumer advances it when applying)."""


# -- decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicate:
    """Seen before under another arrival: record the inbox, tell analytics, no queue item."""

    original: SeenMessage
    redelivery: bool  # the very same event again (a Kafka redelivery), not a second arrival
    event_id: UUID


@dataclass(frozen=True)
class Unroutable:
    reason: str
    detail: str


@dataclass(frozen=True)
class Routed:
    contact_id: UUID
    new_contact: bool
    link: tuple[str, ...]  # identity keys to attach to the contact
    refused: tuple[str, ...]  # identity keys refused (guards), logged
    merged: tuple[UUID, ...]  # contacts merged into contact_id
    # (other contact, identity key): where a claimed identity (or, under "manual",
    # any identity) would have linked or merged, an agent is asked instead.
    suggestions: tuple[tuple[UUID, str], ...]
    conversation_id: UUID
    new_conversation: bool
    owner: str
    owner_changed: bool
    reason: str  # rule:<name>, default, sticky, merged, owner-removed, bounce, auto-reply
    event_id: UUID  # stable: derived from the message id
    assign_cursor: str | None = None  # team whose round-robin cursor advances


Decision = Duplicate | Unroutable | Routed


def _usable(key: str, config: RoutingConfig) -> bool:
    if key in config.blocked_identities:
        return False
    kind, _, value = key.partition(":")
    return not (kind == "email" and value.split("@", 1)[0] in MACHINE_LOCAL_PARTS)


def _pick_agent(team: Team, view: DirectoryView) -> tuple[str, bool]:
    """An agent of the team (or the team itself when all are full); True if RR advanced."""
    if not team.agents:
        return team.name, False
    if team.capacity is None and team.assignment == "round-robin":
        load: Mapping[str, int] = {}  # nobody is full and nobody is compared: no need to count
    else:
        load = view.open_load(team.agents)
    available = [a for a in team.agents if team.capacity is None or load.get(a, 0) < team.capacity]
    if not available:
        return team.name, False
    if team.assignment == "least-loaded":
        return min(available, key=lambda a: (load.get(a, 0), team.agents.index(a))), False
    start = view.round_robin_next(team.name)
    for step in range(len(team.agents)):
        agent = team.agents[(start + step) % len(team.agents)]
        if agent in available:
            return agent, True
    return team.name, False  # pragma: no cover - available is non-empty


def _assign(
    message: InboundMessage,
    config: RoutingConfig,
    view: DirectoryView,
    team_name: str | None = None,
) -> tuple[str, str, str | None]:
    """(owner, reason, team whose cursor advances) for a contact without a valid owner."""
    reason = "default"
    if team_name is None:
        rule = next((r for r in config.rules if r.matches(message)), None)
        team_name = rule.team if rule else config.default_team
        reason = f"rule:{rule.name}" if rule else "default"
    team = config.teams[team_name]
    owner, advanced = _pick_agent(team, view)
    return owner, reason, team.name if advanced else None


@dataclass(frozen=True)
class _Resolution:
    contact: ContactView | None  # None: a new contact
    contact_id: UUID
    link: tuple[str, ...]
    refused: tuple[str, ...]
    merged: tuple[UUID, ...]
    suggestions: tuple[tuple[UUID, str], ...] = ()


def _count(keys: set[str], kind: str) -> int:
    return sum(1 for k in keys if k.startswith(f"{kind}:"))


def _oldest(contacts: Sequence[ContactView]) -> list[ContactView]:
    return sorted({c.id: c for c in contacts}.values(), key=lambda c: (c.created_at, str(c.id)))


def _trusted(message: InboundMessage, keys: list[str], config: RoutingConfig) -> set[str]:
    """The identity keys allowed to link and merge contacts under the policy."""
    if config.merge_policy == "any":
        return set(keys)
    verified = {i.key for i in message.all_identities() if i.assurance == Assurance.VERIFIED}
    return {k for k in keys if k in verified}


def _target(
    message: InboundMessage, keys: list[str], known: Mapping[str, ContactView], trusted: set[str]
) -> tuple[ContactView | None, list[ContactView]]:
    """The contact of the message's most trustworthy known identity, and the
    contacts that merge into it.

    Verified identities first: their contacts are one person, the oldest survives
    (under "manual" nothing merges into it). A message with verified identities none
    of which is known gets a new contact: its claimed sender does not choose one (else
    a backend-verified phone with a typed customer address would link that phone to
    the customer and text into their conversation). Without verified identities, the
    sender's own contact (the first usable identity), or a new one: another claimed
    identity's contact is only suggested, so typing a customer's number into a form
    never writes into that customer's conversation.
    """
    group = _oldest([known[k] for k in keys if k in trusted and k in known])
    if group:
        return group[0], group[1:]
    if trusted:
        return None, []
    return known.get(keys[0]), []


def _resolve(
    message: InboundMessage, keys: list[str], view: DirectoryView, config: RoutingConfig
) -> _Resolution:
    """Which contact; which identities to link; which contacts merge into it; which
    merges to suggest to an agent instead (see the README, "Who is who")."""
    known = dict(view.contacts_for(keys)) if keys else {}
    trusted = _trusted(message, keys, config)
    survivor, mergeable = _target(message, keys, known, trusted)
    if config.merge_policy == "manual":
        mergeable = []
    survivor_id = survivor.id if survivor else derived_id(message.id, "contact")
    merged: tuple[UUID, ...] = ()
    refused: list[str] = []
    owned: set[str] = set(survivor.identities) if survivor else set()
    if survivor is not None and mergeable:
        union = owned.union(*(c.identities for c in mergeable), keys)
        if any(_count(union, k.value) > config.max_identities_per_kind for k in IdentityKind):
            # Merging would give one contact too many identities: refuse, keep the
            # message with the sender's own contact if the sender is verified (a
            # claimed sender's contact would receive the verified identities).
            own = known.get(message.sender.key) if message.sender.key in trusted else None
            survivor = own or survivor
            survivor_id = survivor.id
            owned = set(survivor.identities)
            refused = [k for k in keys if k in known and known[k].id != survivor_id]
        else:
            merged = tuple(c.id for c in mergeable)
            for c in mergeable:
                owned |= c.identities
    merging = {survivor_id, *merged}
    suggestions = {
        (known[k].id, k): None
        for k in keys
        if k in known and known[k].id not in merging and k not in refused
    }
    link: list[str] = []
    for key in keys:
        if key in owned or key in refused or key in known:
            continue
        # A claimed identity links only as the first identity of a new contact made
        # of claims alone: it never joins an existing contact, nor a new one beside
        # verified identities, so a stranger's form cannot attach someone's address
        # to a contact they can later write into (with their own verified phone).
        if key not in trusted and (survivor is not None or key != keys[0] or trusted):
            continue
        if _count(owned, key.split(":", 1)[0]) >= config.max_identities_per_kind:
            refused.append(key)
            continue
        owned.add(key)
        link.append(key)
    return _Resolution(
        survivor, survivor_id, tuple(link), tuple(refused), merged, tuple(suggestions)
    )


def _owner(
    message: InboundMessage,
    contact: ContactView | None,
    merged: bool,
    view: DirectoryView,
    config: RoutingConfig,
) -> tuple[str, str, bool, str | None]:
    """(owner, reason, changed, team whose round-robin cursor advances)."""
    if contact is not None and config.owner_exists(contact.owner):
        return contact.owner, "merged" if merged else "sticky", False, None
    if contact is not None:
        team = config.team_of(contact.owner) or config.default_team
        owner, _, cursor = _assign(message, config, view, team_name=team)
        return owner, "owner-removed", True, cursor
    if message.flags.auto_reply:
        return config.default_team, "auto-reply", True, None  # a robot assigns no agent
    owner, reason, cursor = _assign(message, config, view)
    return owner, reason, True, cursor


def _conversation(
    message: InboundMessage, contact: ContactView | None, view: DirectoryView, config: RoutingConfig
) -> ConversationView | None:
    """A reply joins its thread, only within this contact; else the latest conversation
    if open and recent enough, on any channel; else None (a new one)."""
    if contact is None:
        return None
    thread = [*message.thread.in_reply_to, *message.thread.references]
    if thread:
        found = view.conversation_for_thread(contact.id, thread)
        if found is not None:
            return found
    latest = view.latest_conversation(contact.id)
    if latest is not None and message.received_at - latest.last_message_at <= config.idle_window:
        return latest
    return None


def route(message: InboundMessage, view: DirectoryView, config: RoutingConfig) -> Decision:
    """Decide duplicate, contact, conversation and owner for one message."""
    seen = view.seen(message.dedupe_key)
    if seen is not None:
        return Duplicate(seen, seen.message_id == message.id, derived_id(message.id, "duplicate"))

    keys = [i.key for i in message.all_identities() if _usable(i.key, config)]
    if message.flags.bounce:
        # A bounce belongs to the contact of the message that bounced, never to a
        # contact of its own (mailer-daemon is nobody's customer).
        original = (
            view.message_by_email_id(message.flags.bounced_message_id)
            if message.flags.bounced_message_id
            else None
        )
        contact = view.contact(original.contact_id) if original else None
        if contact is None:
            return Unroutable("bounce-unmatched", "a bounce whose original message is unknown")
        resolution = _Resolution(contact, contact.id, (), (), (), ())
        reason_override: str | None = "bounce"
    elif not keys:
        return Unroutable("no-usable-identity", "every identity of the sender is blocked")
    else:
        resolution = _resolve(message, keys, view, config)
        reason_override = None

    owner, reason, changed, cursor = _owner(
        message, resolution.contact, bool(resolution.merged), view, config
    )
    conversation = _conversation(message, resolution.contact, view, config)
    return Routed(
        contact_id=resolution.contact_id,
        new_contact=resolution.contact is None,
        link=resolution.link,
        refused=resolution.refused,
        merged=resolution.merged,
        suggestions=resolution.suggestions,
        conversation_id=conversation.id if conversation else derived_id(message.id, "conversation"),
        new_conversation=conversation is None,
        owner=owner,
        owner_changed=changed,
        reason=reason_override if reason_override and not changed else reason,
        event_id=derived_id(message.id, "routed"),
        assign_cursor=cursor,
    )
