"""The unified queue: a read model built only from the routed and contacts topics.

Never reads the router's tables, so it can live in its own database and be
rebuilt by replaying the topics (``switchboard sink queue --rebuild``). Every
event is applied at most once: its id goes into ``queue_applied`` in the same
transaction as its effect, and a redelivered or replayed event is skipped.

Events can arrive in any order across the two topics (they are keyed by
contact, and a merge changes the key): a message of a contact that was merged
meanwhile lands on the survivor, and an owner change only wins over a newer one
if it is newer itself (``owner_at``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from normalize.schema import (
    ContactEvent,
    ContactEventKind,
    ConversationStatus,
    MessageDuplicate,
    MessageRouted,
)
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    TYPE_DUPLICATE,
    TYPE_ROUTED,
    EnvelopeError,
    read_data,
    read_meta,
)
from switchboard.kafka import make_consumer
from switchboard.metrics import QUEUE_APPLIED, report_lag
from switchboard.runtime import ThreadedComponent
from switchboard.settings import KafkaSettings
from switchboard.topics import CONTACTS, ROUTED

log = logging.getLogger(__name__)

GROUP = "switchboard-queue"
_TS = DateTime(timezone=True)
PREVIEW = 200

metadata = MetaData()

applied = Table(
    "queue_applied",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("applied_at", _TS, nullable=False),
)
q_contacts = Table(
    "queue_contacts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("owner_at", _TS, nullable=False),
    Column("merged_into", Uuid),
    Column("created_at", _TS, nullable=False),
)
q_identities = Table(
    "queue_identities",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("contact_id", Uuid, nullable=False),
    Index("ix_queue_identities_contact", "contact_id"),
)
q_conversations = Table(
    "queue_conversations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("contact_id", Uuid, nullable=False),
    Column("owner", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # open | waiting | closed
    Column("channels", JSON, nullable=False),
    Column("oldest_unanswered_at", _TS),
    Column("started_at", _TS, nullable=False),
    Column("last_message_at", _TS, nullable=False),
    Column("status_at", _TS),
    Column("last_preview", String(PREVIEW)),
    Column("message_count", Integer, nullable=False),
    Index("ix_queue_conversations_owner", "owner", "status", "oldest_unanswered_at"),
    Index("ix_queue_conversations_contact", "contact_id"),
)
q_messages = Table(
    "queue_messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("conversation_id", Uuid, nullable=False),
    Column("contact_id", Uuid, nullable=False),
    Column("received_at", _TS, nullable=False),
    Column("channel", String(32), nullable=False),
    Column("sender", String(400), nullable=False),
    Column("sender_name", String(256)),
    Column("subject", String(998)),
    Column("text", Text),
    Column("text_new", Text),
    Column("html", Text),
    Column("attachments", JSON, nullable=False),
    Column("auto_reply", Boolean, nullable=False),
    Column("bounce", Boolean, nullable=False),
    Column("inboxes", JSON, nullable=False),
    Index("ix_queue_messages_conversation", "conversation_id", "received_at"),
    Index("ix_queue_messages_contact", "contact_id"),
)
TABLES = (applied, q_messages, q_conversations, q_identities, q_contacts)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _upsert_ignore(c: Connection, table: Table, row: dict[str, Any]) -> bool:
    """Insert unless the primary key exists; True if inserted.

    Asks with RETURNING: ``rowcount`` of ``ON CONFLICT DO NOTHING`` is -1 (truthy)
    through SQLAlchemy 2.1 + psycopg 3, which made every replayed event look new.
    """
    dialect = postgresql if c.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**row).on_conflict_do_nothing()
    result = c.execute(statement.returning(*table.primary_key.columns))
    return result.first() is not None


class NotFound(LookupError):
    pass


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


class QueueStore:
    """Applies events to the read model and answers the API's questions."""

    def __init__(self, engine: Engine, teams: dict[str, Sequence[str]] | None = None) -> None:
        self.engine = engine
        self.teams = {name: tuple(agents) for name, agents in (teams or {}).items()}

    # -- applying events ---------------------------------------------------------

    def apply(self, event_type: str, event_id: str, data: bytes | None) -> bool:
        """Apply one event unless already applied; False if skipped or not ours."""
        contact_types = {f"io.switchboard.{k.value}.v1" for k in ContactEventKind}
        with self.engine.begin() as c:
            if event_type == TYPE_ROUTED:
                routed = read_data(data, MessageRouted)
                if self._first(c, event_id):
                    self._routed(c, routed)
                    return True
            elif event_type == TYPE_DUPLICATE:
                duplicate = read_data(data, MessageDuplicate)
                if self._first(c, event_id):
                    self._duplicate(c, duplicate)
                    return True
            elif event_type == TYPE_CONVERSATION_STATUS:
                status = read_data(data, ConversationStatus)
                if self._first(c, event_id):
                    self._status(c, status)
                    return True
            elif event_type in contact_types:
                contact = read_data(data, ContactEvent)
                if self._first(c, event_id):
                    self._contact(c, contact)
                    return True
        return False

    @staticmethod
    def _first(c: Connection, event_id: str) -> bool:
        """Mark the event applied; False if it already was."""
        return _upsert_ignore(c, applied, {"event_id": UUID(event_id), "applied_at": _now()})

    def _survivor(self, c: Connection, contact_id: UUID) -> UUID:
        merged = c.execute(
            select(q_contacts.c.merged_into).where(q_contacts.c.id == contact_id)
        ).scalar()
        return merged or contact_id

    def _ensure_contact(self, c: Connection, contact_id: UUID, owner: str, at: datetime) -> None:
        _upsert_ignore(
            c,
            q_contacts,
            {"id": contact_id, "owner": owner, "owner_at": at, "created_at": at},
        )

    def _set_owner(self, c: Connection, contact_id: UUID, owner: str, at: datetime) -> None:
        """Record an owner fact unless a newer one is known; conversations follow."""
        row = c.execute(
            select(q_contacts.c.owner, q_contacts.c.owner_at).where(q_contacts.c.id == contact_id)
        ).one()
        if _aware(row.owner_at) > at:  # type: ignore[operator]
            return
        c.execute(
            update(q_contacts).where(q_contacts.c.id == contact_id).values(owner=owner, owner_at=at)
        )
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.contact_id == contact_id)
            .values(owner=owner)
        )

    def _owner_of(self, c: Connection, contact_id: UUID) -> str:
        return str(
            c.execute(select(q_contacts.c.owner).where(q_contacts.c.id == contact_id)).scalar_one()
        )

    def _routed(self, c: Connection, e: MessageRouted) -> None:
        m = e.message
        contact_id = self._survivor(c, e.contact_id)
        self._ensure_contact(c, contact_id, e.owner, e.routed_at)
        if contact_id == e.contact_id:
            # An event of a contact merged since carries that contact's old owner;
            # the survivor keeps its own.
            self._set_owner(c, contact_id, e.owner, e.routed_at)
        owner = self._owner_of(c, contact_id)
        machine = m.flags.auto_reply or m.flags.bounce
        preview = (m.text_new or m.text or m.subject or "")[:PREVIEW]
        conversation = c.execute(
            select(q_conversations).where(q_conversations.c.id == e.conversation_id)
        ).first()
        if conversation is None:
            c.execute(
                insert(q_conversations).values(
                    id=e.conversation_id,
                    contact_id=contact_id,
                    owner=owner,
                    status="open",
                    channels=[m.channel],
                    oldest_unanswered_at=None if machine else m.received_at,
                    started_at=m.received_at,
                    last_message_at=m.received_at,
                    last_preview=preview,
                    message_count=1,
                )
            )
        else:
            values: dict[str, Any] = {
                "contact_id": contact_id,
                "owner": owner,
                "channels": sorted({*conversation.channels, m.channel}),
                "message_count": conversation.message_count + 1,
            }
            if m.received_at >= _aware(conversation.last_message_at):  # type: ignore[operator]
                values["last_message_at"] = m.received_at
                values["last_preview"] = preview
            if not machine:
                # A customer message (re)opens the conversation and waits for an answer.
                values["status"] = "open"
                oldest = _aware(conversation.oldest_unanswered_at)
                values["oldest_unanswered_at"] = min(oldest or m.received_at, m.received_at)
            c.execute(
                update(q_conversations)
                .where(q_conversations.c.id == e.conversation_id)
                .values(**values)
            )
        _upsert_ignore(
            c,
            q_messages,
            {
                "id": m.id,
                "conversation_id": e.conversation_id,
                "contact_id": contact_id,
                "received_at": m.received_at,
                "channel": m.channel,
                "sender": m.sender.key,
                "sender_name": m.sender.display_name,
                "subject": m.subject,
                "text": m.text,
                "text_new": m.text_new,
                "html": m.html,
                "attachments": [a.model_dump(mode="json") for a in m.attachments],
                "auto_reply": m.flags.auto_reply,
                "bounce": m.flags.bounce,
                "inboxes": sorted({r.key for r in m.recipients}),
            },
        )

    def _duplicate(self, c: Connection, e: MessageDuplicate) -> None:
        current = c.execute(
            select(q_messages.c.inboxes).where(q_messages.c.id == e.original_message_id)
        ).scalar()
        if current is None:
            return  # the original's routed event comes later; nothing to add to yet
        merged = sorted({*current, *(r.key for r in e.recipients)})
        c.execute(
            update(q_messages)
            .where(q_messages.c.id == e.original_message_id)
            .values(inboxes=merged)
        )

    def _status(self, c: Connection, e: ConversationStatus) -> None:
        row = c.execute(
            select(q_conversations.c.status_at).where(q_conversations.c.id == e.conversation_id)
        ).first()
        if row is None or (row.status_at and _aware(row.status_at) > e.occurred_at):  # type: ignore[operator]
            return
        values: dict[str, Any] = {"status": e.status, "status_at": e.occurred_at}
        if e.status != "open":
            values["oldest_unanswered_at"] = None
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.id == e.conversation_id)
            .values(**values)
        )

    def _contact(self, c: Connection, e: ContactEvent) -> None:
        contact_id = self._survivor(c, e.contact_id)
        self._ensure_contact(c, contact_id, e.owner or "unassigned", e.occurred_at)
        if e.kind in (ContactEventKind.CREATED, ContactEventKind.OWNER_ASSIGNED) and e.owner:
            self._set_owner(c, contact_id, e.owner, e.occurred_at)
        if e.kind == ContactEventKind.MERGED:
            self._merge(c, contact_id, e.merged_contact_ids, e.occurred_at)
        for key in e.identities:
            dialect = postgresql if c.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(q_identities).values(key=key, contact_id=contact_id)
            c.execute(
                statement.on_conflict_do_update(
                    index_elements=[q_identities.c.key], set_={"contact_id": contact_id}
                )
            )

    def _merge(self, c: Connection, survivor: UUID, merged: Sequence[UUID], at: datetime) -> None:
        owner = self._owner_of(c, survivor)
        ids = list(merged)
        # The merged contacts' own events travel on their partitions and may come
        # after this one: record them now, so those events resolve to the survivor.
        for contact_id in ids:
            self._ensure_contact(c, contact_id, owner, at)
        c.execute(
            update(q_contacts)
            .where(or_(q_contacts.c.id.in_(ids), q_contacts.c.merged_into.in_(ids)))
            .values(merged_into=survivor)
        )
        c.execute(
            update(q_identities)
            .where(q_identities.c.contact_id.in_(ids))
            .values(contact_id=survivor)
        )
        c.execute(
            update(q_conversations)
            .where(q_conversations.c.contact_id.in_(ids))
            .values(contact_id=survivor, owner=owner)
        )
        c.execute(
            update(q_messages).where(q_messages.c.contact_id.in_(ids)).values(contact_id=survivor)
        )

    def reset(self) -> None:
        """Empty the read model (for a rebuild from the earliest offsets)."""
        with self.engine.begin() as c:
            for table in TABLES:
                c.execute(delete(table))

    # -- reading -------------------------------------------------------------------

    def owners(self) -> list[str]:
        with self.engine.connect() as c:
            found = set(c.execute(select(q_conversations.c.owner).distinct()).scalars())
        for team, agents in self.teams.items():
            found |= {team, *agents}
        return sorted(found)

    def queue(
        self, owner: str, *, status: str = "open", limit: int = 50, cursor: str | None = None
    ) -> Page:
        """Conversations of an owner (an agent, or a team: itself and its agents),
        oldest waiting first, then oldest activity; keyset-paginated."""
        who = [owner, *self.teams.get(owner, ())]
        # Conversations nobody waits for sort after every waiting one.
        far = datetime(9999, 1, 1, tzinfo=UTC)
        query = select(q_conversations).where(q_conversations.c.owner.in_(who))
        if status != "all":
            query = query.where(q_conversations.c.status == status)
        with self.engine.connect() as c:
            rows = c.execute(query).all()
        items = sorted(
            rows,
            key=lambda r: (
                _aware(r.oldest_unanswered_at) or far,
                _aware(r.last_message_at),
                str(r.id),
            ),
        )
        if cursor is not None:
            after = _decode_cursor(cursor)
            keyed = [(_sort_key(r, far), r) for r in items]
            items = [r for k, r in keyed if k > after]
        page = items[:limit]
        next_cursor = (
            _encode_cursor(_sort_key(page[-1], far)) if len(items) > limit and page else None
        )
        return Page([_conversation_summary(r) for r in page], next_cursor)

    def conversation(self, conversation_id: UUID) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(
                select(q_conversations).where(q_conversations.c.id == conversation_id)
            ).first()
            if row is None:
                raise NotFound(str(conversation_id))
            found = c.execute(
                select(q_messages)
                .where(q_messages.c.conversation_id == conversation_id)
                .order_by(q_messages.c.received_at, q_messages.c.id)
            ).all()
        return {**_conversation_summary(row), "messages": [_message(m) for m in found]}

    def contact(self, contact_id: UUID) -> dict[str, Any]:
        with self.engine.connect() as c:
            survivor = self._survivor(c, contact_id)
            row = c.execute(select(q_contacts).where(q_contacts.c.id == survivor)).first()
            if row is None:
                raise NotFound(str(contact_id))
            keys = sorted(
                c.execute(
                    select(q_identities.c.key).where(q_identities.c.contact_id == survivor)
                ).scalars()
            )
            convs = c.execute(
                select(q_conversations)
                .where(q_conversations.c.contact_id == survivor)
                .order_by(q_conversations.c.last_message_at.desc())
            ).all()
        return {
            "id": str(survivor),
            "requested_id": str(contact_id),
            "merged": survivor != contact_id,
            "owner": row.owner,
            "identities": keys,
            "conversations": [_conversation_summary(r) for r in convs],
        }

    def contact_by_identity(self, key: str) -> dict[str, Any]:
        with self.engine.connect() as c:
            found = c.execute(
                select(q_identities.c.contact_id).where(q_identities.c.key == key)
            ).scalar()
        if found is None:
            raise NotFound(key)
        return self.contact(found)

    def attachment(self, sha256: str) -> dict[str, Any] | None:
        """The recorded attachment (filename, content type) with this blob, if any."""
        with self.engine.connect() as c:
            rows = c.execute(select(q_messages.c.attachments)).scalars()
            for attachments in rows:
                for a in attachments:
                    blob = a.get("blob") or {}
                    if blob.get("sha256") == sha256:
                        return dict(a)
        return None

    def conversation_contact(self, conversation_id: UUID) -> UUID:
        with self.engine.connect() as c:
            found = c.execute(
                select(q_conversations.c.contact_id).where(q_conversations.c.id == conversation_id)
            ).scalar()
        if found is None:
            raise NotFound(str(conversation_id))
        return UUID(str(found))

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the read model (minus application times), for comparisons."""
        with self.engine.connect() as c:
            return {
                t.name: sorted(
                    (tuple(str(v) for v in r) for r in c.execute(select(t))),
                )
                for t in TABLES
                if t is not applied
            }


def _sort_key(row: Any, far: datetime) -> tuple[str, str, str]:  # noqa: ANN401 - a Row
    return (
        (_aware(row.oldest_unanswered_at) or far).isoformat(),
        _aware(row.last_message_at).isoformat(),  # type: ignore[union-attr]
        str(row.id),
    )


def _encode_cursor(key: tuple[str, str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, binascii.Error) as exc:
        raise BadCursor("cursor is not one this API returned") from exc
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise BadCursor("cursor is not one this API returned")
    return (value[0], value[1], value[2])


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value else None


def _conversation_summary(row: Any) -> dict[str, Any]:  # noqa: ANN401 - a Row
    return {
        "id": str(row.id),
        "contact_id": str(row.contact_id),
        "owner": row.owner,
        "status": row.status,
        "channels": list(row.channels),
        "oldest_unanswered_at": _iso(row.oldest_unanswered_at),
        "started_at": _iso(row.started_at),
        "last_message_at": _iso(row.last_message_at),
        "last_preview": row.last_preview,
        "message_count": row.message_count,
    }


def _message(row: Any) -> dict[str, Any]:  # noqa: ANN401 - a Row
    return {
        "id": str(row.id),
        "received_at": _iso(row.received_at),
        "channel": row.channel,
        "sender": row.sender,
        "sender_name": row.sender_name,
        "subject": row.subject,
        "text": row.text,
        "text_new": row.text_new,
        "html": row.html,
        "attachments": list(row.attachments),
        "flags": {"auto_reply": row.auto_reply, "bounce": row.bounce},
        "inboxes": list(row.inboxes),
    }


def _now() -> datetime:
    return datetime.now(UTC)


class _FromStart(ConsumerRebalanceListener):  # type: ignore[misc]
    """For --rebuild: the first assignment starts at the earliest offsets."""

    def __init__(self) -> None:
        self.consumer: KafkaConsumer | None = None
        self.done: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: object) -> None:
        pass

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self.done]
        if fresh and self.consumer is not None:
            self.consumer.seek_to_beginning(*fresh)
            self.done.update(fresh)


class QueueSink(ThreadedComponent):
    """The consumer: apply every event, then commit. Runs in a thread."""

    name = "queue-sink"

    def __init__(
        self,
        kafka: KafkaSettings,
        store: QueueStore,
        *,
        group_id: str = GROUP,
        rebuild: bool = False,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.group_id = group_id
        self.rebuild = rebuild
        self.applied = 0
        self.skipped = 0
        super().__init__()

    def prepare(self) -> None:
        if self.rebuild:
            self.store.reset()
            log.warning("queue read model emptied; rebuilding from the earliest offsets")

    def _run(self) -> None:
        listener = _FromStart() if self.rebuild else None
        try:
            consumer = make_consumer(
                self.kafka,
                group_id=self.group_id,
                topics=[ROUTED, CONTACTS],
                listener=listener,
                max_poll_records=500,
            )
        except Exception as exc:
            self.start_error = exc
            log.exception("queue sink could not connect to Kafka")
            return
        if listener is not None:
            listener.consumer = consumer
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    polled = consumer.poll(timeout_ms=self.kafka.poll_timeout_ms)
                except KafkaError as exc:
                    log.warning("poll failed; retrying", extra={"error": repr(exc)[:500]})
                    self._stop.wait(1.0)
                    continue
                report_lag(self.group_id, consumer)
                if polled and not self._handle(consumer, polled):
                    self._stop.wait(1.0)
        finally:
            try:
                consumer.close(autocommit=False)
            except Exception:  # closing a broken consumer must not mask the exit
                log.warning("queue consumer did not close cleanly", exc_info=True)

    def _handle(self, consumer: KafkaConsumer, polled: dict[Any, list[Any]]) -> bool:
        """Apply a poll's records; commit what was applied. False: rewound, retry."""
        commits: dict[TopicPartition, OffsetAndMetadata] = {}
        partitions = list(polled.items())
        for index, (tp, records) in enumerate(partitions):
            for record in records:
                try:
                    meta = read_meta(record.headers)
                    done = self.store.apply(meta.type, meta.id, record.value)
                except EnvelopeError as exc:
                    log.warning(
                        "event skipped: not a valid event",
                        extra={"reason": exc.reason, "topic": tp.topic, "offset": record.offset},
                    )
                    done = False
                except Exception:
                    # The database is away, or a bug: keep every unapplied record.
                    log.exception("queue update failed; the records will be retried")
                    consumer.seek(tp, record.offset)
                    for later, later_records in partitions[index + 1 :]:
                        consumer.seek(later, later_records[0].offset)
                    self._commit(consumer, commits)
                    return False
                if done:
                    QUEUE_APPLIED.labels(meta.type).inc()
                self.applied += int(done)
                self.skipped += int(not done)
                commits[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
        self._commit(consumer, commits)
        return True

    def _commit(
        self, consumer: KafkaConsumer, commits: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        if not commits:
            return
        try:
            consumer.commit(commits)
        except (CommitFailedError, KafkaError) as exc:
            log.warning(
                "queue offsets not committed; events will be re-applied (no-ops)",
                extra={"error": repr(exc)},
            )
