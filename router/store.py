"""The contact directory in SQL, and applying routing decisions to it.

One batch of inbound messages is routed in one database transaction:

1. **Locks, in one fixed order** (PostgreSQL; SQLite has a single writer and
   takes it up front with ``BEGIN IMMEDIATE``):
   a. transaction-scoped advisory locks on every identity key and dedupe key of
      the batch, sorted by their 64-bit hash, after one all-keys lock in shared
      mode: two routers never race on a new contact, a new identity link or a
      dedupe key. A batch over the lock budget takes the all-keys lock exclusively
      instead (:func:`router.directory.lock_keys`: PostgreSQL's lock table is shared
      and small);
   b. ``SELECT ... FOR UPDATE`` on every contact those identities (and bounced
      messages) lead to, ordered by id: merges and owner changes are serialized;
      a contact found merged meanwhile restarts the batch (:class:`Conflict`);
   c. when some message may need a new owner, the team rows (round-robin
      cursors), ordered by name.
   Every lock is taken before any write, in the same order in every router, so
   two routers cannot deadlock: whoever waits, waits for a transaction that
   already holds everything it needs. One kind of row comes later: a merge
   repoints the contacts merged into its loser earlier, rows no lock above
   covers (one may be held by a router that locked a contact just merged away,
   or by an agent's unmerge); a merge takes them without waiting and restarts
   the batch if one is held (:func:`router.writes.lock_merged_into`).
   The same step reads, in bulk, everything the batch's decisions can ask
   (:class:`router.directory.BatchDirectory`).
2. **Decide** message by message from that memory, kept current after each
   decision, and hold the rows back (:class:`router.writes.Writes`).
3. **Write** them in a handful of bulk statements, with the events in
   ``router_events`` (the outbox), in the same transaction. A message whose events
   are recorded is done: when Kafka redelivers it (the router crashed before
   committing its offset), the same events are re-emitted byte for byte, with the
   same ids.

When a message fails on its own (not an outage), the transaction is rolled back
and the batch is routed again message by message, each in a savepoint, and the
message that keeps failing is dead-lettered.

The jobs live in their own modules: :mod:`router.tables` (the tables),
:mod:`router.directory` (reads and locks), :mod:`router.apply` (a decision's
rows and events), :mod:`router.merges` (an agent's merge and unmerge) and
:mod:`router.outbox` (recorded events); this module composes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from uuid import UUID

from sqlalchemy import Connection, Engine, and_, delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from normalize.schema import ContactEventKind, InboundMessage
from router import outbox as _outbox
from router.apply import Outcome, apply, contact_event, dead_letter
from router.decide import RoutingConfig, route
from router.directory import BatchDirectory, Conflict, is_transient
from router.merges import (
    MergeRefused,
    UnknownContact,
    merge_by_agent,
    retrying,
    unmerge,
)
from router.outbox import event_rows, new_event_uuid, record, topic_of
from router.tables import contacts, conversations, dedupe_keys, messages, outbox, owners, utcnow
from router.writes import Writes
from switchboard.events import Event
from switchboard.metrics import ROUTER_RESTARTS, ROUTER_STATEMENTS

__all__ = [
    "Conflict",
    "MergeRefused",
    "Outcome",
    "RouterStore",
    "UnknownContact",
    "UnknownOwner",
    "is_transient",
    "topic_of",
]

log = logging.getLogger(__name__)


@contextmanager
def _counted(c: Connection) -> Iterator[None]:
    """Count the statements a batch sends (``switchboard_router_sql_statements``);
    the driver's ``COPY`` statements are added by the caller (:attr:`Writes.copies`)."""

    def count(*_args: object) -> None:
        ROUTER_STATEMENTS.inc()

    event.listen(c, "before_cursor_execute", count)
    try:
        yield
    finally:
        event.remove(c, "before_cursor_execute", count)


class UnknownOwner(LookupError):
    pass


class RouterStore:
    """Routes batches of messages against the SQL directory; see the module doc."""

    def __init__(
        self,
        engine: Engine,
        config: RoutingConfig,
        *,
        retention: timedelta = timedelta(days=30),
        max_attempts: int = 3,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.clock = clock  # the dedupe retention's and purge's: tests move time instead of waiting
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
        now = utcnow()
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
            with self.engine.begin() as c, _counted(c):
                return self._route_all(c, batch)
        except Conflict:
            ROUTER_RESTARTS.inc()
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "a message of the batch failed; routing the batch in halves",
                extra={"error": repr(exc)[:500], "batch": len(batch)},
            )
        with self.engine.begin() as c, _counted(c):
            # Every lock of the batch first, in the one order; each part then takes
            # its own again (already held) in its savepoint.
            BatchDirectory.load(c, batch, self.config, self.retention, Writes(), now=self.clock())
            return self._halves(c, batch)

    def _halves(self, c: Connection, batch: Sequence[InboundMessage]) -> list[Outcome]:
        """A batch that failed, as two halves in savepoints, in order; a half that
        fails is split again, down to single messages (:meth:`_route_one`). One bad
        message in a poll of n costs about log2(n) failed savepoints, not n
        savepoints (on PostgreSQL more than 64 subtransactions slow every snapshot)."""
        if len(batch) == 1:
            return [self._route_one(c, batch[0])]
        middle = len(batch) // 2
        return [
            outcome
            for half in (batch[:middle], batch[middle:])
            for outcome in (self._part(c, half) or self._halves(c, half))
        ]

    def _part(self, c: Connection, part: Sequence[InboundMessage]) -> list[Outcome]:
        """``part`` routed as one batch in a savepoint; [] if a message of it failed."""
        if len(part) == 1:
            return []  # single messages are retried and dead-lettered by _route_one
        try:
            with c.begin_nested():
                return self._route_all(c, part)
        except Exception as exc:
            if is_transient(exc):
                raise
            return []

    def _route_all(self, c: Connection, messages: Sequence[InboundMessage]) -> list[Outcome]:
        """Load the messages' directory (taking their locks), decide each in order,
        and send the held-back rows."""
        writes = Writes()
        now = self.clock()
        directory = BatchDirectory.load(c, messages, self.config, self.retention, writes, now=now)
        outcomes = [self._route(message, directory) for message in messages]
        writes.flush(c, now)
        ROUTER_STATEMENTS.inc(writes.copies)
        return outcomes

    def _route(self, message: InboundMessage, directory: BatchDirectory) -> Outcome:
        """Decide from the batch's directory, hold back the rows, keep the directory current."""
        replayed = directory.recorded.get(message.id)
        if replayed is not None:
            return Outcome(message.id, "replayed", replayed)
        decision = route(message, directory, self.config)
        outcome = apply(message, decision, directory, self.config)
        directory.writes.events.extend(event_rows(message.id, outcome.events))
        directory.recorded_as(message.id, outcome.events)
        return outcome

    def _route_one(self, c: Connection, message: InboundMessage) -> Outcome:
        """One message as a batch of its own in a savepoint, retried, dead-lettered
        when it keeps failing."""
        failure: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                with c.begin_nested():
                    return self._route_all(c, [message])[0]
            except Exception as exc:
                if is_transient(exc):
                    raise
                failure = exc
                log.exception(
                    "routing failed",
                    extra={"message_id": str(message.id), "attempt": attempt},
                )
        events = (
            dead_letter(
                message,
                "routing-failed",
                f"{type(failure).__name__}: {failure}" if failure else "unknown",
                {"attempts": self.max_attempts},
            ),
        )
        record(c, message.id, events)
        return Outcome(message.id, "failed", events, "routing-failed")

    # -- operations --------------------------------------------------------------

    def assign(self, contact_id: UUID, owner: str, *, by: str | None = None) -> Event:
        """Reassign a contact (following merges) and record ``owner.assigned``, with
        ``by``: who reassigned it (an agent, or None from tooling that does not say).

        The event is recorded as pending; the caller publishes it and calls
        :meth:`mark_published`, or a running router's relay does.
        """
        if not self.config.owner_exists(owner):
            raise UnknownOwner(owner)
        return retrying(lambda: self._assign(contact_id, owner, by))

    def _assign(self, contact_id: UUID, owner: str, by: str | None) -> Event:
        with self.engine.begin() as c:
            row = c.execute(
                select(contacts.c.id, contacts.c.merged_into).where(contacts.c.id == contact_id)
            ).first()
            if row is None:
                raise UnknownContact(str(contact_id))
            target = row.merged_into or row.id
            locked = c.execute(
                select(contacts.c.owner, contacts.c.merged_into)
                .where(contacts.c.id == target)
                .with_for_update()
            ).one()
            if locked.merged_into is not None:
                # A router merged it while this waited for the row: the owner goes to
                # where it lives on now (a review found it given to the merged-away
                # row, and the event naming that row).
                raise Conflict("the contact was merged meanwhile")
            previous = locked.owner
            # Stamped once the row is ours, so that it orders after every event a
            # router made about the contact while holding it.
            now = utcnow()
            c.execute(
                update(contacts).where(contacts.c.id == target).values(owner=owner, updated_at=now)
            )
            c.execute(
                update(conversations)
                .where(conversations.c.contact_id == target)
                .values(owner=owner)
            )
            event = contact_event(
                ContactEventKind.OWNER_ASSIGNED,
                target,
                new_event_uuid(),
                now,
                owner=owner,
                previous_owner=previous,
                reason="manual",
                by=by,
            )
            record(c, None, [event], pending=True)
        return event

    def merge(self, contact_id: UUID, other_id: UUID, *, by: str | None = None) -> Event:
        """An agent merges ``other_id`` into ``contact_id`` (both followed to their
        survivors), as the router merges: identities, conversations and messages
        move, the survivor keeps its owner. ``contact.merged`` is recorded pending
        (with ``by``); the caller publishes it, or a running router's relay does."""
        return retrying(lambda: merge_by_agent(self.engine, contact_id, other_id, by))

    def unmerge(self, contact_id: UUID, merged_id: UUID, *, by: str | None = None) -> Event:
        """Undo the merge of ``merged_id`` into ``contact_id`` (see :func:`router.merges.unmerge`);
        ``contact.unmerged`` is recorded pending, like :meth:`merge`."""
        return retrying(lambda: unmerge(self.engine, contact_id, merged_id, by))

    def pending(self, limit: int = 500) -> list[Event]:
        """Events recorded outside a Kafka record (an agent's actions) not yet published."""
        return _outbox.pending(self.engine, limit)

    def mark_published(self, event_ids: Sequence[str]) -> None:
        _outbox.mark_published(self.engine, event_ids)

    def purge(self) -> tuple[int, int]:
        """Forget dedupe keys and recorded events older than the retention."""
        cutoff = self.clock() - self.retention
        with self.engine.begin() as c:
            keys = c.execute(delete(dedupe_keys).where(dedupe_keys.c.seen_at < cutoff)).rowcount
            events = c.execute(
                delete(outbox).where(and_(outbox.c.time < cutoff, outbox.c.pending.is_(False)))
            ).rowcount
        return int(keys or 0), int(events or 0)

    def referenced_blobs(self, among: Collection[str]) -> set[str]:
        """Which of these blobs a recorded event still references (raw payloads and
        attachments of routed messages, until :meth:`purge` forgets the events)."""
        return _outbox.referenced_blobs(self.engine, among)

    def figures(self) -> dict[str, int]:
        """Live contacts, messages and unpublished events, for ``switchboard status``."""
        with self.engine.connect() as c:
            return figures(c)


def figures(c: Connection) -> dict[str, int]:
    """The directory's figures over an open connection."""

    def count(query: object) -> int:
        return int(c.scalar(query) or 0)  # type: ignore[call-overload]

    return {
        "contacts": count(
            select(func.count()).select_from(contacts).where(contacts.c.merged_into.is_(None))
        ),
        "messages": count(select(func.count()).select_from(messages)),
        "pending_events": count(
            select(func.count()).select_from(outbox).where(outbox.c.pending.is_(True))
        ),
    }
