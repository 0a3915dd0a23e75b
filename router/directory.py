"""What a batch's decisions read, and the locks taken before any write.

:meth:`BatchDirectory.load` takes one poll's locks (module doc of
:mod:`router.store`) and reads, in a handful of bulk queries, everything the
decisions of that poll can ask: the contacts of every identity key, with all
their identities; each contact's latest conversation; the messages every
``In-Reply-To``/``References`` and bounce points at; the dedupe keys; the events
already recorded for redelivered messages; the round-robin cursors and, where a
team balances by load, the open conversations per agent. The decisions then
read memory (:class:`BatchDirectory` is the pure router's
:class:`~router.decide.DirectoryView`), and :mod:`router.apply` keeps that memory
current after each decision, so a contact created or merged early in the batch
is seen by the messages after it.

What the load did not read is a bug, not a slow path: a read outside it raises
:class:`NotLoaded`, and the store routes that batch message by message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, any_, bindparam, func, select, text
from sqlalchemy.dialects import postgresql

from normalize.schema import InboundMessage
from router.decide import ContactView, ConversationView, RoutingConfig, SeenMessage
from router.outbox import stored
from router.tables import (
    aware,
    contacts,
    conversations,
    dedupe_keys,
    identities,
    messages,
    outbox,
    owners,
    utcnow,
)
from router.writes import Conflict, Writes, chunks
from switchboard.consumer import is_outage
from switchboard.events import Event
from switchboard.metrics import ROUTER_ALL_KEYS_LOCKS, ROUTER_LOCK_SECONDS

__all__ = [
    "BatchDirectory",
    "Conflict",
    "NotLoaded",
    "aware",
    "is_transient",
    "lock_contacts",
    "lock_id",
    "utcnow",
]


def _in(column: Any, name: str, pg: bool) -> Any:  # noqa: ANN401 - SQL expressions
    """``column IN (...)``: on PostgreSQL ``= ANY(:array)``, one parameter however many
    values (an expanding IN renders and parses one placeholder per value)."""
    if pg:
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


@dataclass(frozen=True)
class _Statements:
    """The load's statements for one dialect, built once (building one costs more
    than running it)."""

    advisory: Any
    identities_of_keys: Any
    contacts_of_email_ids: Any
    lock_contacts: Any
    identities_of_contacts: Any
    lock_teams: Any
    cursors: Any
    latest_conversations: Any
    messages_by_email_id: Any
    recorded: Any
    seen: Any
    open_of: Any
    open_load: Any


def _statements(pg: bool) -> _Statements:
    advisory = text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:ids AS bigint[])) AS t(k)")
    identities_of_keys = select(identities.c.key, identities.c.contact_id).where(
        _in(identities.c.key, "keys", pg)
    )
    contacts_of_email_ids = select(messages.c.contact_id).where(
        _in(messages.c.email_message_id, "ids", pg)
    )
    lock_contacts = (
        select(contacts.c.id, contacts.c.created_at, contacts.c.owner, contacts.c.merged_into)
        .where(_in(contacts.c.id, "ids", pg))
        .order_by(contacts.c.id)
        .with_for_update()
    )
    identities_of_contacts = select(identities.c.key, identities.c.contact_id).where(
        _in(identities.c.contact_id, "ids", pg)
    )
    lock_teams = (
        select(owners.c.name, owners.c.rr_next)
        .where(owners.c.kind == "team")
        .order_by(owners.c.name)
        .with_for_update()
    )
    cursors = select(owners.c.name, owners.c.rr_next).where(owners.c.kind == "team")
    ranked = (
        select(
            conversations.c.id,
            conversations.c.contact_id,
            conversations.c.last_message_at,
            func.row_number()
            .over(
                partition_by=conversations.c.contact_id,
                order_by=conversations.c.last_message_at.desc(),
            )
            .label("rank"),
        )
        .where(_in(conversations.c.contact_id, "ids", pg))
        .subquery()
    )
    latest_conversations = select(ranked.c.id, ranked.c.contact_id, ranked.c.last_message_at).where(
        ranked.c.rank == 1
    )
    messages_by_email_id = (
        select(
            messages.c.email_message_id,
            messages.c.id,
            messages.c.contact_id,
            messages.c.conversation_id,
            messages.c.received_at,
            conversations.c.contact_id.label("conversation_contact"),
            conversations.c.last_message_at,
        )
        .join(conversations, conversations.c.id == messages.c.conversation_id)
        .where(_in(messages.c.email_message_id, "ids", pg))
    )
    recorded = (
        select(outbox)
        .where(_in(outbox.c.message_id, "ids", pg))
        .order_by(outbox.c.message_id, outbox.c.seq)
    )
    seen = (
        select(
            dedupe_keys.c.key,
            dedupe_keys.c.seen_at,
            messages.c.id,
            func.coalesce(contacts.c.merged_into, contacts.c.id).label("contact_id"),
            messages.c.conversation_id,
        )
        .join(messages, messages.c.id == dedupe_keys.c.message_id)
        .join(contacts, contacts.c.id == messages.c.contact_id)
        .where(_in(dedupe_keys.c.key, "keys", pg))
    )
    open_of = (
        select(conversations.c.contact_id, func.count())
        .where(
            _in(conversations.c.contact_id, "ids", pg),
            conversations.c.last_message_at >= bindparam("since"),
        )
        .group_by(conversations.c.contact_id)
    )
    # A range of ix_conversations_owner_last per agent: as many rows as the agents
    # have open conversations, not as many as the tables hold.
    open_load = (
        select(conversations.c.owner, func.count())
        .where(
            _in(conversations.c.owner, "agents", pg),
            conversations.c.last_message_at >= bindparam("since"),
        )
        .group_by(conversations.c.owner)
    )
    return _Statements(
        advisory=advisory,
        identities_of_keys=identities_of_keys,
        contacts_of_email_ids=contacts_of_email_ids,
        lock_contacts=lock_contacts,
        identities_of_contacts=identities_of_contacts,
        lock_teams=lock_teams,
        cursors=cursors,
        latest_conversations=latest_conversations,
        messages_by_email_id=messages_by_email_id,
        recorded=recorded,
        seen=seen,
        open_of=open_of,
        open_load=open_load,
    )


_SQL = {"postgresql": _statements(pg=True), "sqlite": _statements(pg=False)}


class NotLoaded(LookupError):
    """A decision asked what the batch's load did not read (a bug in the load)."""


# A web hook's post without an Idempotency-Key or an id is deduplicated by a
# fingerprint of its payload: that catches a sender's retries, which come within
# minutes. Kept for the whole dedupe retention (30 days), it also swallowed a
# customer who posted the same words to the same form again days later: the second
# post became a duplicate and never reached the queue (attacker review, 2026-11-30).
FINGERPRINT_WINDOW = timedelta(hours=1)


def is_content_fingerprint(dedupe_key: str) -> bool:
    """A hook's payload fingerprint (``webhook:<hook>:fp:<digest>``), as opposed to a
    key or id the sender chose, a Message-ID, or a provider's message id."""
    prefix, _, rest = dedupe_key.partition(":")
    # A hook's name holds no ":": what follows it is the kind of key.
    return prefix == "webhook" and rest.partition(":")[2].startswith("fp:")


def lock_id(value: str) -> int:
    """A signed 64-bit advisory lock id for a string."""
    return int.from_bytes(
        hashlib.blake2b(value.encode(), digest_size=8).digest(), "big", signed=True
    )


# PostgreSQL keeps every lock in one shared table of max_locks_per_transaction x
# (max_connections + max_prepared_transactions) entries: 6,400 by default, for all
# sessions together. A poll of 700 form posts carrying 21 identities each wanted
# 15,000 advisory locks: "out of shared memory" (SQLSTATE 53200), which the consumer
# rightly retries as an outage, forever, with the partition stalled (attacker
# review, 2026-11-30). So a batch takes at most LOCK_BUDGET key locks: every batch
# holds one lock shared by all routers in shared mode, and a batch whose keys need
# more than the budget takes that one lock exclusively instead of its key locks:
# it then excludes every other router (and agent merge) for its transaction, which
# is what its key locks would have done for the keys it touches.
LOCK_BUDGET = 2048
ALL_KEYS_LOCK = lock_id("switchboard:router:all-keys")
_ALL_SHARED = text("SELECT pg_advisory_xact_lock_shared(:k)")
_ALL_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(:k)")


def lock_keys(c: Connection, names: Collection[str], budget: int = LOCK_BUDGET) -> bool:
    """Advisory locks for ``names`` (PostgreSQL), taken in the one order: the
    all-keys lock first, then the key locks sorted by id. True when the batch was
    over ``budget`` and holds the all-keys lock exclusively instead."""
    ids = sorted({lock_id(n) for n in names})
    if len(ids) > budget:
        c.execute(_ALL_EXCLUSIVE, {"k": ALL_KEYS_LOCK})
        return True
    c.execute(_ALL_SHARED, {"k": ALL_KEYS_LOCK})
    c.execute(_SQL[c.dialect.name].advisory, {"ids": ids})
    return False


def is_transient(exc: BaseException) -> bool:
    """Worth retrying the whole batch for (connection lost, deadlock, serialization
    failure, a conflict with another router), as opposed to a failure of one
    message: the consumer runtime's classification, one rule for every consumer."""
    return is_outage(exc)


def lock_contacts(c: Connection, ids: Collection[UUID], current: Collection[UUID]) -> None:
    """The routers' lock order (module doc of :mod:`router.store`): advisory locks on
    the contacts' identity keys, then the contact rows by id. :class:`Conflict` when
    one of ``current`` was merged away before the lock was ours."""
    sql = _SQL[c.dialect.name]
    wanted = {"ids": sorted(ids)}
    if c.dialect.name == "postgresql":
        keys = {key for key, _ in c.execute(sql.identities_of_contacts, wanted)}
        lock_keys(c, {f"id:{k}" for k in keys})
    rows = c.execute(sql.lock_contacts, wanted).all()
    if any(r.merged_into is not None for r in rows if r.id in current):
        raise Conflict("a contact was merged by a router meanwhile")


@dataclass
class ContactState:
    id: UUID
    created_at: datetime
    owner: str
    identities: set[str]

    def view(self) -> ContactView:
        return ContactView(self.id, self.created_at, self.owner, frozenset(self.identities))


@dataclass
class ConversationState:
    id: UUID
    contact_id: UUID  # as read or created: follow merges with BatchDirectory.survivor
    last_message_at: datetime


@dataclass(frozen=True)
class MessageRef:
    """A routed message as a thread or a bounce finds it by its email Message-ID."""

    message_id: UUID
    contact_id: UUID
    conversation_id: UUID
    received_at: datetime


class BatchDirectory:
    """One batch's directory in memory; see the module doc."""

    def __init__(
        self,
        c: Connection,
        config: RoutingConfig,
        retention: timedelta,
        writes: Writes,
        *,
        now: datetime | None = None,
    ) -> None:
        self.c = c
        self.sql = _SQL[c.dialect.name]
        self.config = config
        self.retention = retention
        self.writes = writes
        self.now = now or utcnow()
        self.contacts: dict[UUID, ContactState] = {}  # surviving contacts only
        self.merged_into: dict[UUID, UUID] = {}  # merged away in this batch -> survivor
        self.by_key: dict[str, UUID] = {}
        self.keys_read: set[str] = set()  # identity keys looked up (found or not)
        self.latest: dict[UUID, UUID | None] = {}  # contact -> its latest conversation
        self.conversations: dict[UUID, ConversationState] = {}
        self.by_email_id: dict[str, list[MessageRef]] = {}
        self.email_ids_read: set[str] = set()
        self.seen_keys: dict[str, SeenMessage | None] = {}
        self.stale: set[str] = set()  # dedupe keys with an expired row still in the table
        self.recorded: dict[UUID, tuple[Event, ...]] = {}  # message -> its recorded events
        self.cursors: dict[str, int] | None = None  # team -> round-robin cursor
        # Open conversations (a message inside the idle window), kept only where a
        # team balances by load or caps it: per agent (for the agents read), and
        # per contact of the batch, so a merge or a new owner moves its count.
        self.open_counts: dict[str, int] = {}
        self.open_of: dict[UUID, int] | None = None

    # -- the load ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        c: Connection,
        batch: Sequence[InboundMessage],
        config: RoutingConfig,
        retention: timedelta,
        writes: Writes,
        *,
        now: datetime | None = None,
    ) -> BatchDirectory:
        """Take the batch's locks, then read what its decisions can ask (``now``: the
        time the dedupe retention counts back from; the router's clock)."""
        self = cls(c, config, retention, writes, now=now)
        keys = sorted({i.key for m in batch for i in m.all_identities()})
        bounced = sorted({m.flags.bounced_message_id for m in batch if m.flags.bounced_message_id})
        locking = time.perf_counter()
        if c.dialect.name == "postgresql":
            # a. advisory locks on every identity and dedupe key, by hash (or, past
            # the lock budget, one lock that excludes every other router)
            wanted = {f"id:{k}" for k in keys} | {f"dd:{m.dedupe_key}" for m in batch}
            if lock_keys(c, wanted):
                ROUTER_ALL_KEYS_LOCKS.inc()
        found: dict[str, UUID] = {}
        for part in chunks(keys):
            found.update(
                (k, i) for k, i in c.execute(self.sql.identities_of_keys, {"keys": list(part)})
            )
        ids = set(found.values())
        for part in chunks(bounced):
            ids.update(c.execute(self.sql.contacts_of_email_ids, {"ids": list(part)}).scalars())
        # b. the contact rows, by id
        self._lock_contacts(sorted(ids))
        self.keys_read.update(keys)
        # c. the teams, when a message may need a new owner
        needs_owner = len(found) < len(keys) or any(
            not config.owner_exists(s.owner) for s in self.contacts.values()
        )
        if needs_owner:
            self.cursors = {n: int(v) for n, v in c.execute(self.sql.lock_teams)}
        ROUTER_LOCK_SECONDS.observe(time.perf_counter() - locking)
        if needs_owner:
            self._read_load(
                a
                for t in config.teams.values()
                if t.capacity is not None or t.assignment == "least-loaded"
                for a in t.agents
            )
        self._read_latest(sorted(ids))
        thread = {t for m in batch for t in (*m.thread.in_reply_to, *m.thread.references)}
        self._read_email_ids(sorted(thread | set(bounced)))
        self._read_recorded([m.id for m in batch])
        self._read_seen(sorted({m.dedupe_key for m in batch}))
        return self

    def _lock_contacts(self, ids: Sequence[UUID]) -> None:
        rows: list[Any] = []
        for part in chunks(ids):
            rows.extend(self.c.execute(self.sql.lock_contacts, {"ids": list(part)}).all())
        if any(row.merged_into is not None for row in rows):
            raise Conflict("a contact of this batch was merged by another router")
        for row in rows:
            self.contacts[row.id] = ContactState(row.id, aware(row.created_at), row.owner, set())
        for part in chunks(ids):
            for key, contact_id in self.c.execute(
                self.sql.identities_of_contacts, {"ids": list(part)}
            ):
                self.contacts[contact_id].identities.add(key)
                self.by_key[key] = contact_id

    def _read_latest(self, ids: Sequence[UUID]) -> None:
        self.latest.update(dict.fromkeys(ids))
        for part in chunks(ids):
            for row in self.c.execute(self.sql.latest_conversations, {"ids": list(part)}):
                self.latest[row.contact_id] = row.id
                self.conversations.setdefault(
                    row.id, ConversationState(row.id, row.contact_id, aware(row.last_message_at))
                )

    def _read_email_ids(self, email_ids: Sequence[str]) -> None:
        self.email_ids_read.update(email_ids)
        for part in chunks(email_ids):
            for row in self.c.execute(self.sql.messages_by_email_id, {"ids": list(part)}):
                self.by_email_id.setdefault(row.email_message_id, []).append(
                    MessageRef(row.id, row.contact_id, row.conversation_id, aware(row.received_at))
                )
                self.conversations.setdefault(
                    row.conversation_id,
                    ConversationState(
                        row.conversation_id, row.conversation_contact, aware(row.last_message_at)
                    ),
                )

    def _read_recorded(self, ids: Sequence[UUID]) -> None:
        found: dict[UUID, list[Event]] = {}
        for part in chunks(ids):
            for row in self.c.execute(self.sql.recorded, {"ids": list(part)}):
                found.setdefault(row.message_id, []).append(stored(row))
        self.recorded.update((m, tuple(events)) for m, events in found.items())

    def _read_seen(self, keys: Sequence[str]) -> None:
        self.seen_keys.update(dict.fromkeys(keys))
        cutoff = self.now - self.retention
        fingerprint_cutoff = self.now - min(self.retention, FINGERPRINT_WINDOW)
        for part in chunks(keys):
            for row in self.c.execute(self.sql.seen, {"keys": list(part)}):
                limit = fingerprint_cutoff if is_content_fingerprint(row.key) else cutoff
                if aware(row.seen_at) >= limit:
                    self.seen_keys[row.key] = SeenMessage(
                        row.id, row.contact_id, row.conversation_id
                    )
                else:
                    self.stale.add(row.key)

    def _read_load(self, agents: Iterable[str]) -> None:
        wanted = sorted(set(agents) - set(self.open_counts))
        if not wanted:
            return
        self.writes.flush(self.c, self.now)  # (a no-op when read by the load)
        self.open_counts.update(dict.fromkeys(wanted, 0))
        since = self.now - self.config.idle_window
        for owner, n in self.c.execute(self.sql.open_load, {"agents": wanted, "since": since}):
            self.open_counts[owner] = int(n)
        if self.open_of is None:
            ids = sorted(self.contacts)
            self.open_of = dict.fromkeys(ids, 0)
            for part in chunks(ids):
                params = {"ids": list(part), "since": since}
                for contact_id, n in self.c.execute(self.sql.open_of, params):
                    self.open_of[contact_id] = int(n)

    def _move_open(self, contact_id: UUID, from_owner: str, to_owner: str) -> None:
        """A contact's open conversations now count for another owner."""
        n = (self.open_of or {}).get(contact_id, 0)
        if from_owner in self.open_counts:
            self.open_counts[from_owner] -= n
        if to_owner in self.open_counts:
            self.open_counts[to_owner] += n

    # -- DirectoryView: what the decisions read -------------------------------------

    def survivor(self, contact_id: UUID) -> UUID:
        while contact_id in self.merged_into:
            contact_id = self.merged_into[contact_id]
        return contact_id

    def seen(self, dedupe_key: str) -> SeenMessage | None:
        if dedupe_key not in self.seen_keys:
            raise NotLoaded(f"dedupe key {dedupe_key!r}")
        found = self.seen_keys[dedupe_key]
        if found is None:
            return None
        return SeenMessage(found.message_id, self.survivor(found.contact_id), found.conversation_id)

    def contacts_for(self, keys: Sequence[str]) -> Mapping[str, ContactView]:
        if not self.keys_read.issuperset(keys):
            raise NotLoaded(f"identity keys {sorted(set(keys) - self.keys_read)!r}")
        return {
            key: self.contacts[self.survivor(self.by_key[key])].view()
            for key in keys
            if key in self.by_key
        }

    def _refs(self, email_ids: Iterable[str]) -> list[MessageRef]:
        email_ids = list(email_ids)
        if not self.email_ids_read.issuperset(email_ids):
            raise NotLoaded(f"email ids {sorted(set(email_ids) - self.email_ids_read)!r}")
        return [ref for e in email_ids for ref in self.by_email_id.get(e, ())]

    def message_by_email_id(self, email_message_id: str) -> SeenMessage | None:
        refs = self._refs([email_message_id])
        if not refs:
            return None
        ref = max(refs, key=lambda r: r.received_at)
        return SeenMessage(ref.message_id, self.survivor(ref.contact_id), ref.conversation_id)

    def contact(self, contact_id: UUID) -> ContactView | None:
        state = self.contacts.get(self.survivor(contact_id))
        if state is None:
            raise NotLoaded(f"contact {contact_id}")
        return state.view()

    def conversation_for_thread(
        self, contact_id: UUID, email_ids: Sequence[str]
    ) -> ConversationView | None:
        refs = [r for r in self._refs(email_ids) if self.survivor(r.contact_id) == contact_id]
        if not refs:
            return None
        return self._view(max(refs, key=lambda r: r.received_at).conversation_id)

    def latest_conversation(self, contact_id: UUID) -> ConversationView | None:
        if contact_id not in self.latest:
            raise NotLoaded(f"latest conversation of {contact_id}")
        latest = self.latest[contact_id]
        return None if latest is None else self._view(latest)

    def _view(self, conversation_id: UUID) -> ConversationView:
        state = self.conversations[conversation_id]
        return ConversationView(state.id, self.survivor(state.contact_id), state.last_message_at)

    def open_load(self, agents: Sequence[str]) -> Mapping[str, int]:
        """Conversations with a message inside the idle window, per owning agent."""
        self._read_load(agents)
        return {a: self.open_counts[a] for a in agents}

    def round_robin_next(self, team: str) -> int:
        if self.cursors is None:  # not locked: no message of the batch needed an owner
            self.cursors = {n: int(v) for n, v in self.c.execute(self.sql.cursors)}
        return self.cursors.get(team, 0)

    # -- keeping it current as decisions are applied -----------------------------

    def identities_of(self, contact_id: UUID) -> set[str]:
        return set(self.contacts[contact_id].identities)

    def owner_of(self, contact_id: UUID) -> str:
        return self.contacts[contact_id].owner

    def created(self, contact_id: UUID, owner: str, now: datetime) -> None:
        self.contacts[contact_id] = ContactState(contact_id, now, owner, set())
        self.latest[contact_id] = None
        if self.open_of is not None:
            self.open_of[contact_id] = 0

    def linked(self, contact_id: UUID, keys: Iterable[str]) -> None:
        for key in keys:
            self.contacts[contact_id].identities.add(key)
            self.by_key[key] = contact_id

    def cursor(self, team: str, value: int) -> None:
        if self.cursors is None:  # pragma: no cover - advancing a cursor read it first
            self.cursors = {n: int(v) for n, v in self.c.execute(self.sql.cursors)}
        self.cursors[team] = value

    def owner_changed(self, contact_id: UUID, owner: str) -> None:
        self._move_open(contact_id, self.contacts[contact_id].owner, owner)
        self.contacts[contact_id].owner = owner

    def merged(self, survivor: UUID, merged: Iterable[UUID]) -> None:
        """A merge, in memory (the rows move when the batch's writes are flushed)."""
        into = self.contacts[survivor]
        for gone_id in merged:
            self._move_open(gone_id, self.contacts[gone_id].owner, into.owner)
            if self.open_of is not None:
                self.open_of[survivor] += self.open_of.pop(gone_id, 0)
            gone = self.contacts.pop(gone_id)
            into.identities |= gone.identities
            for key in gone.identities:
                self.by_key[key] = survivor
            self.merged_into[gone_id] = survivor
            theirs, mine = self.latest.pop(gone_id, None), self.latest.get(survivor)
            if theirs is not None and (
                mine is None
                or self.conversations[theirs].last_message_at
                > self.conversations[mine].last_message_at
            ):
                self.latest[survivor] = theirs

    def conversation_used(
        self, contact_id: UUID, conversation_id: UUID, at: datetime, *, new: bool
    ) -> None:
        """A message joined (or started) a conversation: its time, the contact's
        latest conversation, and its owner's open count."""
        since = self.now - self.config.idle_window
        if new:
            state = ConversationState(conversation_id, contact_id, at)
            self.conversations[conversation_id] = state
            was_open = False
        else:
            state = self.conversations[conversation_id]
            was_open = state.last_message_at >= since
            state.last_message_at = max(state.last_message_at, at)
        opened = int(state.last_message_at >= since) - int(was_open)
        if self.open_of is not None:
            self.open_of[contact_id] = self.open_of.get(contact_id, 0) + opened
        owner = self.contacts[contact_id].owner
        if owner in self.open_counts:
            self.open_counts[owner] += opened
        latest = self.latest.get(contact_id)
        if latest is None or state.last_message_at > self.conversations[latest].last_message_at:
            self.latest[contact_id] = conversation_id

    def routed(
        self,
        message: InboundMessage,
        contact_id: UUID,
        conversation_id: UUID,
    ) -> None:
        self.seen_keys[message.dedupe_key] = SeenMessage(message.id, contact_id, conversation_id)
        self.stale.discard(message.dedupe_key)
        if message.thread.message_id:
            self.by_email_id.setdefault(message.thread.message_id, []).append(
                MessageRef(message.id, contact_id, conversation_id, message.received_at)
            )

    def recorded_as(self, message_id: UUID, events: Sequence[Event]) -> None:
        self.recorded[message_id] = tuple(events)
