"""The contact directory in SQL, and applying routing decisions to it.

One batch of inbound messages is routed in one database transaction:

1. **Locks, in one fixed order** (PostgreSQL; SQLite has a single writer and
   takes it up front with ``BEGIN IMMEDIATE``):
   a. transaction-scoped advisory locks on every identity key and dedupe key of
      the batch, sorted by their 64-bit hash: two routers never race on a new
      contact, a new identity link or a dedupe key;
   b. ``SELECT ... FOR UPDATE`` on every contact those identities (and bounced
      messages) lead to, ordered by id: merges and owner changes are serialized;
      a contact found merged meanwhile restarts the batch (:class:`Conflict`);
   c. when some message may need a new owner, the team rows (round-robin
      cursors), ordered by name.
   Every lock is taken before any write, in the same order in every router, so
   two routers cannot deadlock: whoever waits, waits for a transaction that
   already holds everything it needs.
2. **Decide and apply** message by message (each in a savepoint), reading
   through :class:`SqlDirectory`, which sees the batch's own earlier writes.
3. **Record the events** in ``router_events`` (the outbox) in the same
   transaction. A message whose events are recorded is done: when Kafka
   redelivers it (the router crashed before committing its offset), the same
   events are re-emitted byte for byte, with the same ids.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import uuid6
from pydantic import BaseModel
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Uuid,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    DeadLetter,
    InboundMessage,
    MessageDuplicate,
    MessageRouted,
)
from router.decide import (
    ContactView,
    ConversationView,
    Decision,
    Duplicate,
    Routed,
    RoutingConfig,
    SeenMessage,
    Unroutable,
    derived_id,
    route,
)
from switchboard.events import (
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    Event,
    contact_event_type,
)
from switchboard.topics import CONTACTS, DEADLETTER, ROUTED

log = logging.getLogger(__name__)

SOURCE = "switchboard/router"
_TS = DateTime(timezone=True)

metadata = MetaData()

contacts = Table(
    "contacts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_at", _TS, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("merged_into", Uuid, ForeignKey("contacts.id")),
    Column("merged_at", _TS),
    Column("updated_at", _TS, nullable=False),
    Index("ix_contacts_owner", "owner"),
    Index("ix_contacts_merged_into", "merged_into"),
)
identities = Table(
    "contact_identities",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("linked_at", _TS, nullable=False),
    Column("message_id", Uuid),
    Index("ix_contact_identities_contact", "contact_id"),
)
owners = Table(
    "owners",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("kind", String(8), nullable=False),  # agent | team
    Column("team", String(128), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("rr_next", Integer, nullable=False),  # teams: the round-robin cursor
    Column("updated_at", _TS, nullable=False),
)
conversations = Table(
    "conversations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("started_at", _TS, nullable=False),
    Column("last_message_at", _TS, nullable=False),
    Column("message_count", Integer, nullable=False),
    Index("ix_conversations_contact_last", "contact_id", "last_message_at"),
)
messages = Table(
    "messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("dedupe_key", String(1024), nullable=False),
    Column("contact_id", Uuid, ForeignKey("contacts.id"), nullable=False),
    Column("conversation_id", Uuid, ForeignKey("conversations.id"), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("email_message_id", String(998)),
    Column("received_at", _TS, nullable=False),
    Column("routed_at", _TS, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("reason", String(160), nullable=False),
    Index("ix_messages_contact_email_id", "contact_id", "email_message_id"),
    Index("ix_messages_email_id", "email_message_id"),
    Index("ix_messages_conversation", "conversation_id"),
)
inboxes = Table(
    "message_inboxes",
    metadata,
    Column("message_id", Uuid, ForeignKey("messages.id"), primary_key=True),
    Column("inbox", String(400), primary_key=True),
    Column("first_seen_at", _TS, nullable=False),
)
dedupe_keys = Table(
    "dedupe_keys",
    metadata,
    Column("key", String(1024), primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("seen_at", _TS, nullable=False),
    Index("ix_dedupe_keys_seen_at", "seen_at"),
)
outbox = Table(
    "router_events",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("message_id", Uuid),  # None for events not caused by a message (manual assign)
    Column("seq", Integer, nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", String(400), nullable=False),
    Column("type", String(128), nullable=False),
    Column("source", String(255), nullable=False),
    Column("time", _TS, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("pending", Boolean, nullable=False),  # True: not yet known to be on Kafka
    Index("ix_router_events_message", "message_id", "seq"),
    Index("ix_router_events_pending", "pending"),
    Index("ix_router_events_time", "time"),
)


_DEFERRED = (messages, inboxes, dedupe_keys, outbox)

# The statements every message runs, built once (building one costs more than
# running it); parameters are bound per call.
_asked = identities.alias("asked")
_CONTACTS_FOR = (
    select(
        _asked.c.key.label("asked"),
        contacts.c.id,
        contacts.c.created_at,
        contacts.c.owner,
        identities.c.key,
    )
    .select_from(_asked)
    .join(contacts, contacts.c.id == _asked.c.contact_id)
    .join(identities, identities.c.contact_id == contacts.c.id)
    .where(_asked.c.key.in_(bindparam("keys", expanding=True)))
)
_LATEST_CONVERSATION = (
    select(conversations.c.id, conversations.c.contact_id, conversations.c.last_message_at)
    .where(conversations.c.contact_id == bindparam("contact_id"))
    .order_by(conversations.c.last_message_at.desc())
    .limit(1)
)


class Conflict(Exception):
    """Another router changed what this batch locked (a contact merged meanwhile):
    roll back and route the batch again."""


class UnknownContact(LookupError):
    pass


class UnknownOwner(LookupError):
    pass


@dataclass(frozen=True)
class Outcome:
    """What routing one message produced: the events to publish, and a label."""

    message_id: UUID
    result: str  # routed, duplicate, unroutable, failed, replayed
    events: tuple[Event, ...]
    reason: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were stored as UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _lock_id(value: str) -> int:
    """A signed 64-bit advisory lock id for a string."""
    return int.from_bytes(
        hashlib.blake2b(value.encode(), digest_size=8).digest(), "big", signed=True
    )


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying the whole batch for (connection lost,
    deadlock, serialization failure), as opposed to a bug in one message."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, DBAPIError):
        return True
    return isinstance(exc, Conflict)


@dataclass
class BatchKnowledge:
    """What one batch's transaction learned in bulk up front, kept current as the
    batch's own messages are applied: two queries per batch instead of two per
    message. Only facts the batch's locks protect are kept here."""

    recorded: set[UUID]  # messages of the batch whose events are already recorded
    seen: dict[str, SeenMessage | None]  # dedupe key -> first message (None: unseen)
    stale: set[str]  # dedupe keys with an expired row still in the table
    # Write-behind: rows nobody reads while the batch runs, inserted with executemany
    # at the end, or earlier by flush() before a read of their tables.
    deferred: dict[str, list[dict[str, object]]] = field(
        default_factory=lambda: {t.name: [] for t in _DEFERRED}
    )

    def defer(self, table: Table, rows: Sequence[dict[str, object]]) -> None:
        self.deferred[table.name].extend(rows)

    def flush(self, c: Connection) -> None:
        for table in _DEFERRED:  # in foreign-key order
            rows = self.deferred[table.name]
            if rows:
                c.execute(insert(table), rows)
                rows.clear()

    def discard(self) -> None:
        for rows in self.deferred.values():
            rows.clear()

    @classmethod
    def load(
        cls, c: Connection, batch: Sequence[InboundMessage], retention: timedelta
    ) -> BatchKnowledge:
        ids = [m.id for m in batch]
        recorded = set(
            c.execute(select(outbox.c.message_id).where(outbox.c.message_id.in_(ids))).scalars()
        )
        keys = sorted({m.dedupe_key for m in batch})
        seen: dict[str, SeenMessage | None] = dict.fromkeys(keys)
        stale: set[str] = set()
        cutoff = _now() - retention
        survivor = func.coalesce(contacts.c.merged_into, contacts.c.id)
        rows = c.execute(
            select(
                dedupe_keys.c.key,
                dedupe_keys.c.seen_at,
                messages.c.id,
                survivor.label("contact_id"),
                messages.c.conversation_id,
            )
            .join(messages, messages.c.id == dedupe_keys.c.message_id)
            .join(contacts, contacts.c.id == messages.c.contact_id)
            .where(dedupe_keys.c.key.in_(keys))
        )
        for row in rows:
            if _aware(row.seen_at) >= cutoff:
                seen[row.key] = SeenMessage(row.id, row.contact_id, row.conversation_id)
            else:
                stale.add(row.key)
        return cls(recorded, seen, stale)

    def applied(self, message: InboundMessage, decision: Decision) -> None:
        """Keep the knowledge current once a message's savepoint is released."""
        self.recorded.add(message.id)
        if isinstance(decision, Routed):
            self.seen[message.dedupe_key] = SeenMessage(
                message.id, decision.contact_id, decision.conversation_id
            )
            self.stale.discard(message.dedupe_key)
            merged = set(decision.merged)
            if merged:
                for key, found in self.seen.items():
                    if found is not None and found.contact_id in merged:
                        self.seen[key] = SeenMessage(
                            found.message_id, decision.contact_id, found.conversation_id
                        )


class SqlDirectory:
    """:class:`router.decide.DirectoryView` over one open transaction."""

    def __init__(
        self,
        connection: Connection,
        retention: timedelta,
        idle_window: timedelta,
        known: BatchKnowledge | None = None,
    ) -> None:
        self.c = connection
        self.retention = retention
        self.idle_window = idle_window
        self.known = known
        self.loaded: dict[UUID, ContactView] = {}  # contacts read in this decision

    def seen(self, dedupe_key: str) -> SeenMessage | None:
        if self.known is not None and dedupe_key in self.known.seen:
            return self.known.seen[dedupe_key]
        row = self.c.execute(
            select(messages.c.id, messages.c.contact_id, messages.c.conversation_id)
            .join(dedupe_keys, dedupe_keys.c.message_id == messages.c.id)
            .where(
                dedupe_keys.c.key == dedupe_key, dedupe_keys.c.seen_at >= _now() - self.retention
            )
        ).first()
        if row is None:
            return None
        survivor = self._survivor(row.contact_id)
        return SeenMessage(row.id, survivor, row.conversation_id)

    def _survivor(self, contact_id: UUID) -> UUID:
        merged_into = self.c.execute(
            select(contacts.c.merged_into).where(contacts.c.id == contact_id)
        ).scalar()
        return merged_into or contact_id

    def _contacts(self, ids: Iterable[UUID]) -> dict[UUID, ContactView]:
        wanted = list(set(ids))
        if not wanted:
            return {}
        keys: dict[UUID, set[str]] = {i: set() for i in wanted}
        for key, contact_id in self.c.execute(
            select(identities.c.key, identities.c.contact_id).where(
                identities.c.contact_id.in_(wanted)
            )
        ):
            keys[contact_id].add(key)
        return {
            row.id: ContactView(row.id, _aware(row.created_at), row.owner, frozenset(keys[row.id]))
            for row in self.c.execute(
                select(contacts.c.id, contacts.c.created_at, contacts.c.owner).where(
                    contacts.c.id.in_(wanted)
                )
            )
        }

    def contacts_for(self, keys: Sequence[str]) -> Mapping[str, ContactView]:
        """One round trip: the asked keys, their contacts, and all those contacts' keys."""
        rows = self.c.execute(_CONTACTS_FOR, {"keys": list(keys)}).all()
        owned: dict[UUID, set[str]] = {}
        owners_of: dict[UUID, tuple[datetime, str]] = {}
        asked_of: dict[str, UUID] = {}
        for row in rows:
            owned.setdefault(row.id, set()).add(row.key)
            owners_of[row.id] = (_aware(row.created_at), row.owner)
            asked_of[row.asked] = row.id
        views = {
            cid: ContactView(cid, owners_of[cid][0], owners_of[cid][1], frozenset(keys_))
            for cid, keys_ in owned.items()
        }
        self.loaded.update(views)
        return {key: views[cid] for key, cid in asked_of.items()}

    def message_by_email_id(self, email_message_id: str) -> SeenMessage | None:
        self._flush()
        row = self.c.execute(
            select(messages.c.id, messages.c.contact_id, messages.c.conversation_id)
            .where(messages.c.email_message_id == email_message_id)
            .order_by(messages.c.received_at.desc())
            .limit(1)
        ).first()
        return (
            SeenMessage(row.id, self._survivor(row.contact_id), row.conversation_id)
            if row
            else None
        )

    def contact(self, contact_id: UUID) -> ContactView | None:
        survivor = self._survivor(contact_id)
        views = self._contacts([survivor])
        self.loaded.update(views)
        return views.get(survivor)

    @staticmethod
    def _conversation(row: Any) -> ConversationView | None:  # noqa: ANN401 - a Row
        if row is None:
            return None
        # The router's notion of open: the idle window decides (see README).
        return ConversationView(row.id, row.contact_id, _aware(row.last_message_at), True)

    def _flush(self) -> None:
        if self.known is not None:
            self.known.flush(self.c)

    def conversation_for_thread(
        self, contact_id: UUID, email_ids: Sequence[str]
    ) -> ConversationView | None:
        self._flush()
        row = self.c.execute(
            select(conversations.c.id, conversations.c.contact_id, conversations.c.last_message_at)
            .join(messages, messages.c.conversation_id == conversations.c.id)
            .where(messages.c.contact_id == contact_id, messages.c.email_message_id.in_(email_ids))
            .order_by(messages.c.received_at.desc())
            .limit(1)
        ).first()
        return self._conversation(row)

    def latest_conversation(self, contact_id: UUID) -> ConversationView | None:
        row = self.c.execute(_LATEST_CONVERSATION, {"contact_id": contact_id}).first()
        return self._conversation(row)

    def open_load(self, agents: Sequence[str]) -> Mapping[str, int]:
        """Conversations with a message inside the idle window, per owning agent."""
        rows = self.c.execute(
            select(contacts.c.owner, func.count())
            .select_from(conversations.join(contacts, contacts.c.id == conversations.c.contact_id))
            .where(
                contacts.c.owner.in_(agents),
                conversations.c.last_message_at >= _now() - self.idle_window,
            )
            .group_by(contacts.c.owner)
        )
        return {owner: int(n) for owner, n in rows}

    def round_robin_next(self, team: str) -> int:
        value = self.c.execute(select(owners.c.rr_next).where(owners.c.name == team)).scalar()
        return int(value or 0)


def _event(type_: str, key: str, data: BaseModel, event_id: UUID) -> Event:
    return Event(type=type_, source=SOURCE, key=key, data=data, id=str(event_id))


class RouterStore:
    """Routes batches of messages against the SQL directory; see the module doc."""

    def __init__(
        self,
        engine: Engine,
        config: RoutingConfig,
        *,
        retention: timedelta = timedelta(days=30),
        max_attempts: int = 3,
    ) -> None:
        self.engine = engine
        self.config = config
        self.retention = retention
        self.max_attempts = max_attempts
        self.postgres = engine.dialect.name == "postgresql"

    # -- owners --------------------------------------------------------------

    def sync_owners(self) -> None:
        """Make the owners table match the configured teams and agents.

        Owners no longer configured stay as rows, inactive: their contacts keep
        them until their next message, which reassigns within the team.
        """
        now = _now()
        wanted: dict[str, tuple[str, str]] = {}
        for team in self.config.teams.values():
            wanted[team.name] = ("team", team.name)
            for agent in team.agents:
                wanted.setdefault(agent, ("agent", team.name))
        dialect = postgresql if self.postgres else sqlite
        rows = [
            {"name": n, "kind": k, "team": t, "active": True, "rr_next": 0, "updated_at": now}
            for n, (k, t) in sorted(wanted.items())
        ]
        # Upserts in name order: routers starting together converge instead of
        # failing on each other's inserts (a round-robin cursor is never reset).
        upsert = dialect.insert(owners)
        upsert = upsert.on_conflict_do_update(
            index_elements=[owners.c.name],
            set_={
                "kind": upsert.excluded.kind,
                "team": upsert.excluded.team,
                "active": True,
                "updated_at": upsert.excluded.updated_at,
            },
        )
        with self.engine.begin() as c:
            for row in rows:
                c.execute(upsert, row)
            c.execute(
                update(owners)
                .where(owners.c.name.not_in(sorted(wanted)), owners.c.active.is_(True))
                .values(active=False, updated_at=now)
            )

    # -- routing ---------------------------------------------------------------

    def route_batch(self, batch: Sequence[InboundMessage]) -> list[Outcome]:
        """Route messages in one transaction; return their outcomes in order.

        Raises a transient error (:func:`is_transient`) when the whole batch must
        be retried; a message that fails on its own is retried ``max_attempts``
        times and then dead-lettered, and the batch goes on.
        """
        try:
            with self.engine.begin() as c:
                self._lock(c, batch)
                known = BatchKnowledge.load(c, batch, self.retention)
                outcomes = [self._route_fast(c, message, known) for message in batch]
                known.flush(c)
                return outcomes
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "a message of the batch failed; routing the batch message by message",
                extra={"error": repr(exc)[:500], "batch": len(batch)},
            )
        with self.engine.begin() as c:
            self._lock(c, batch)
            known = BatchKnowledge.load(c, batch, self.retention)
            return [self._route_one(c, message, known) for message in batch]

    def _route_fast(self, c: Connection, message: InboundMessage, known: BatchKnowledge) -> Outcome:
        """No savepoint: any failure rolls the batch back to the careful path."""
        if message.id in known.recorded:
            known.flush(c)
            return Outcome(message.id, "replayed", tuple(self._replay(c, message.id)))
        view = SqlDirectory(c, self.retention, self.config.idle_window, known)
        decision = route(message, view, self.config)
        outcome = self._apply(c, message, decision, view)
        self._record(c, message.id, outcome.events, known=known)
        known.applied(message, decision)
        return outcome

    def _lock(self, c: Connection, batch: Sequence[InboundMessage]) -> None:
        if not self.postgres:
            return  # SQLite: BEGIN IMMEDIATE already holds the only write lock
        keys = {f"id:{i.key}" for m in batch for i in m.all_identities()}
        keys |= {f"dd:{m.dedupe_key}" for m in batch}
        ids = sorted({_lock_id(k) for k in keys})
        c.execute(
            text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:ids AS bigint[])) AS t(k)"),
            {"ids": ids},
        )
        identity_keys = sorted({i.key for m in batch for i in m.all_identities()})
        found = set(
            c.execute(
                select(identities.c.contact_id).where(identities.c.key.in_(identity_keys))
            ).scalars()
        )
        bounced = [m.flags.bounced_message_id for m in batch if m.flags.bounced_message_id]
        if bounced:
            found |= set(
                c.execute(
                    select(messages.c.contact_id).where(messages.c.email_message_id.in_(bounced))
                ).scalars()
            )
        locked = c.execute(
            select(contacts.c.id, contacts.c.merged_into, contacts.c.owner)
            .where(contacts.c.id.in_(sorted(found)))
            .order_by(contacts.c.id)
            .with_for_update()
        ).all()
        if any(row.merged_into is not None for row in locked):
            raise Conflict("a contact of this batch was merged by another router")
        known = set(
            c.execute(select(identities.c.key).where(identities.c.key.in_(identity_keys))).scalars()
        )
        needs_owner = len(known) < len(identity_keys) or any(
            not self.config.owner_exists(row.owner) for row in locked
        )
        if needs_owner:
            c.execute(
                select(owners.c.name)
                .where(owners.c.kind == "team")
                .order_by(owners.c.name)
                .with_for_update()
            ).all()

    def _replay(self, c: Connection, message_id: UUID) -> list[Event]:
        rows = c.execute(
            select(outbox).where(outbox.c.message_id == message_id).order_by(outbox.c.seq)
        ).all()
        return [_stored(row) for row in rows]

    def _route_one(self, c: Connection, message: InboundMessage, known: BatchKnowledge) -> Outcome:
        """One message in a savepoint, retried, dead-lettered when it keeps failing."""
        if message.id in known.recorded:
            return Outcome(message.id, "replayed", tuple(self._replay(c, message.id)))
        view = SqlDirectory(c, self.retention, self.config.idle_window, known)
        failure: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                with c.begin_nested():
                    decision = route(message, view, self.config)
                    outcome = self._apply(c, message, decision, view)
                    self._record(c, message.id, outcome.events, known=known)
                    known.flush(c)
                known.applied(message, decision)
                return outcome
            except Exception as exc:
                known.discard()
                if is_transient(exc):
                    raise
                failure = exc
                log.exception(
                    "routing failed",
                    extra={"message_id": str(message.id), "attempt": attempt},
                )
        letter = DeadLetter(
            id=derived_id(message.id, "dead-letter"),
            stage="router",
            adapter=message.adapter,
            reason="routing-failed",
            detail=f"{type(failure).__name__}: {failure}"[:4000] if failure else "unknown",
            occurred_at=_now(),
            raw=message.raw,
            source_event_id=str(message.id),
            metadata={"dedupe_key": message.dedupe_key, "attempts": self.max_attempts},
        )
        events = (_event(TYPE_DEADLETTER, message.partition_key, letter, letter.id),)
        self._record(c, message.id, events)
        return Outcome(message.id, "failed", events, "routing-failed")

    def _record(
        self,
        c: Connection,
        message_id: UUID | None,
        events: Sequence[Event],
        *,
        pending: bool = False,
        known: BatchKnowledge | None = None,
    ) -> None:
        if not events:
            return
        rows: list[dict[str, object]] = [
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
        if known is not None:
            known.defer(outbox, rows)
        else:
            c.execute(insert(outbox), rows)

    def _apply(
        self, c: Connection, message: InboundMessage, decision: Decision, view: SqlDirectory
    ) -> Outcome:
        now = _now()
        if isinstance(decision, Unroutable):
            letter = DeadLetter(
                id=derived_id(message.id, "dead-letter"),
                stage="router",
                adapter=message.adapter,
                reason=decision.reason,
                detail=decision.detail,
                occurred_at=now,
                raw=message.raw,
                source_event_id=str(message.id),
                metadata={"dedupe_key": message.dedupe_key, "sender": message.sender.key},
            )
            log.warning(
                "message not routable",
                extra={"message_id": str(message.id), "reason": decision.reason},
            )
            event = _event(TYPE_DEADLETTER, message.partition_key, letter, letter.id)
            return Outcome(message.id, "unroutable", (event,), decision.reason)
        if isinstance(decision, Duplicate):
            return self._apply_duplicate(c, message, decision, now, view)
        return self._apply_routed(c, message, decision, now, view)

    def _add_inboxes(
        self, c: Connection, message_id: UUID, message: InboundMessage, now: datetime
    ) -> None:
        present = set(
            c.execute(select(inboxes.c.inbox).where(inboxes.c.message_id == message_id)).scalars()
        )
        new = sorted({r.key for r in message.recipients} - present)
        if new:
            c.execute(
                insert(inboxes),
                [{"message_id": message_id, "inbox": key, "first_seen_at": now} for key in new],
            )

    def _apply_duplicate(
        self,
        c: Connection,
        message: InboundMessage,
        decision: Duplicate,
        now: datetime,
        view: SqlDirectory,
    ) -> Outcome:
        original = decision.original
        if view.known is not None:
            view.known.flush(c)  # the original may be a deferred row of this batch
        self._add_inboxes(c, original.message_id, message, now)
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
        event = _event(TYPE_DUPLICATE, str(original.contact_id), data, decision.event_id)
        return Outcome(message.id, "duplicate", (event,), "duplicate")

    def _apply_routed(
        self, c: Connection, message: InboundMessage, d: Routed, now: datetime, view: SqlDirectory
    ) -> Outcome:
        events: list[Event] = []
        contact_key = str(d.contact_id)
        previous_owner: str | None = None
        if d.new_contact:
            c.execute(
                insert(contacts).values(
                    id=d.contact_id, created_at=now, owner=d.owner, updated_at=now
                )
            )
        else:
            loaded = view.loaded.get(d.contact_id)
            previous_owner = (
                loaded.owner
                if loaded is not None
                else c.execute(
                    select(contacts.c.owner).where(contacts.c.id == d.contact_id)
                ).scalar()
            )
            if d.owner_changed:
                c.execute(
                    update(contacts)
                    .where(contacts.c.id == d.contact_id)
                    .values(owner=d.owner, updated_at=now)
                )
        if d.merged:
            if view.known is not None:
                view.known.flush(c)  # the merged contacts' messages move with them
            events.append(self._merge(c, message, d, now))
        if d.link:
            c.execute(
                insert(identities),
                [
                    {
                        "key": key,
                        "contact_id": d.contact_id,
                        "kind": key.split(":", 1)[0],
                        "linked_at": now,
                        "message_id": message.id,
                    }
                    for key in d.link
                ],
            )
        if d.refused:
            log.warning(
                "identity link refused: the contact has the maximum of that kind",
                extra={
                    "message_id": str(message.id),
                    "contact_id": contact_key,
                    "refused": list(d.refused),
                },
            )
        events.extend(_contact_events(message, d, now, previous_owner))
        if d.assign_cursor is not None:
            team = self.config.teams[d.assign_cursor]
            c.execute(
                update(owners)
                .where(owners.c.name == team.name)
                .values(rr_next=(team.agents.index(d.owner) + 1) % len(team.agents), updated_at=now)
            )
        if d.new_conversation:
            c.execute(
                insert(conversations).values(
                    id=d.conversation_id,
                    contact_id=d.contact_id,
                    started_at=message.received_at,
                    last_message_at=message.received_at,
                    message_count=1,
                )
            )
        else:
            c.execute(
                update(conversations)
                .where(conversations.c.id == d.conversation_id)
                .values(
                    last_message_at=(func.greatest if self.postgres else func.max)(
                        conversations.c.last_message_at, literal(message.received_at, _TS)
                    ),
                    message_count=conversations.c.message_count + 1,
                )
            )
        known = view.known
        if known is None:  # pragma: no cover - route_batch always passes what it knows
            raise RuntimeError("apply needs the batch's knowledge")
        known.defer(
            messages,
            [
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
                }
            ],
        )
        known.defer(
            inboxes,
            [
                {"message_id": message.id, "inbox": k, "first_seen_at": now}
                for k in sorted({r.key for r in message.recipients})
            ],
        )
        if message.dedupe_key in known.stale:
            c.execute(delete(dedupe_keys).where(dedupe_keys.c.key == message.dedupe_key))
        known.defer(
            dedupe_keys, [{"key": message.dedupe_key, "message_id": message.id, "seen_at": now}]
        )
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
        events.append(_event(TYPE_ROUTED, contact_key, routed, d.event_id))
        return Outcome(message.id, "routed", tuple(events), d.reason)

    def _merge(self, c: Connection, message: InboundMessage, d: Routed, now: datetime) -> Event:
        merged = list(d.merged)
        moved = sorted(
            c.execute(select(identities.c.key).where(identities.c.contact_id.in_(merged))).scalars()
        )
        for table in (identities, conversations, messages):
            c.execute(
                update(table).where(table.c.contact_id.in_(merged)).values(contact_id=d.contact_id)
            )
        # Contacts merged into the losers earlier now point at the survivor directly,
        # so following a merge is always one step.
        c.execute(
            update(contacts)
            .where(contacts.c.merged_into.in_(merged))
            .values(merged_into=d.contact_id)
        )
        c.execute(
            update(contacts)
            .where(contacts.c.id.in_(merged))
            .values(merged_into=d.contact_id, merged_at=now, updated_at=now)
        )
        log.info(
            "contacts merged",
            extra={
                "survivor": str(d.contact_id),
                "merged": [str(m) for m in merged],
                "message_id": str(message.id),
            },
        )
        return _contact_event(
            ContactEventKind.MERGED,
            d.contact_id,
            derived_id(message.id, "contact-merged"),
            now,
            identities=tuple(moved),
            merged_contact_ids=d.merged,
            message_id=message.id,
        )

    # -- operations --------------------------------------------------------------

    def assign(self, contact_id: UUID, owner: str) -> Event:
        """Reassign a contact (following merges) and record ``owner.assigned``.

        The event is recorded as pending; the caller publishes it and calls
        :meth:`mark_published`, or a running router's relay does.
        """
        if not self.config.owner_exists(owner):
            raise UnknownOwner(owner)
        now = _now()
        with self.engine.begin() as c:
            row = c.execute(
                select(contacts.c.id, contacts.c.merged_into).where(contacts.c.id == contact_id)
            ).first()
            if row is None:
                raise UnknownContact(str(contact_id))
            target = row.merged_into or row.id
            previous = c.execute(
                select(contacts.c.owner).where(contacts.c.id == target).with_for_update()
            ).scalar_one()
            c.execute(
                update(contacts).where(contacts.c.id == target).values(owner=owner, updated_at=now)
            )
            event = _contact_event(
                ContactEventKind.OWNER_ASSIGNED,
                target,
                _new_event_uuid(),
                now,
                owner=owner,
                previous_owner=previous,
                reason="manual",
            )
            self._record(c, None, [event], pending=True)
        return event

    def pending(self, limit: int = 500) -> list[Event]:
        """Events recorded outside a Kafka record (manual assignments) not yet published."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(outbox)
                .where(outbox.c.pending.is_(True))
                .order_by(outbox.c.time)
                .limit(limit)
            ).all()
        return [_stored(row) for row in rows]

    def mark_published(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        with self.engine.begin() as c:
            c.execute(
                update(outbox)
                .where(outbox.c.id.in_([UUID(e) for e in event_ids]))
                .values(pending=False)
            )

    def purge(self) -> tuple[int, int]:
        """Forget dedupe keys and recorded events older than the retention."""
        cutoff = _now() - self.retention
        with self.engine.begin() as c:
            keys = c.execute(delete(dedupe_keys).where(dedupe_keys.c.seen_at < cutoff)).rowcount
            events = c.execute(
                delete(outbox).where(and_(outbox.c.time < cutoff, outbox.c.pending.is_(False)))
            ).rowcount
        return int(keys or 0), int(events or 0)

    def resolve_contact(self, contact_id: UUID) -> UUID | None:
        """The surviving id of a contact, or None if unknown."""
        with self.engine.connect() as c:
            row = c.execute(
                select(contacts.c.id, contacts.c.merged_into).where(contacts.c.id == contact_id)
            ).first()
        return None if row is None else (row.merged_into or row.id)


def _contact_event(
    kind: ContactEventKind,
    contact_id: UUID,
    event_id: UUID,
    occurred_at: datetime,
    **fields: Any,  # noqa: ANN401 - ContactEvent's optional fields
) -> Event:
    data = ContactEvent(
        event_id=event_id, kind=kind, contact_id=contact_id, occurred_at=occurred_at, **fields
    )
    return _event(contact_event_type(kind), str(contact_id), data, event_id)


def _contact_events(
    message: InboundMessage, d: Routed, now: datetime, previous_owner: str | None
) -> list[Event]:
    """contact.created for a new contact; else identity.linked and owner.assigned."""

    def event(kind: ContactEventKind, **fields: Any) -> Event:  # noqa: ANN401
        return _contact_event(
            kind,
            d.contact_id,
            derived_id(message.id, kind.value.replace(".", "-")),
            now,
            message_id=message.id,
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


_TOPIC_BY_TYPE = {TYPE_DEADLETTER: DEADLETTER, TYPE_ROUTED: ROUTED, TYPE_DUPLICATE: ROUTED}


def topic_of(event: Event) -> str:
    """The topic a router event belongs on, from its type (contact events otherwise)."""
    return _TOPIC_BY_TYPE.get(event.type, CONTACTS)


def _stored(row: Any) -> Event:  # noqa: ANN401 - a Row of router_events
    return Event(
        type=row.type,
        source=row.source,
        key=row.key,
        data=bytes(row.data),
        id=str(row.id),
        time=_aware(row.time),
    )


def _new_event_uuid() -> UUID:
    return uuid.UUID(str(uuid6.uuid7()))
