"""A batch's writes, held back and sent as a handful of bulk statements.

Routing a poll (up to ``[router] max_poll_records`` messages) used to cost four or
five statements per message; the decisions read an in-memory view
(:class:`router.directory.BatchDirectory`) and write here instead, and
:meth:`Writes.flush` sends each table's rows in one statement, in foreign-key
order, at the end of the batch (or before a read of
open conversations after the load). On PostgreSQL: ``COPY`` for new rows and
``UPDATE ... FROM (VALUES ...)`` for changed ones; on SQLite, whose driver runs in
process, one ``executemany`` each. The batch's merges come last, all of them in a
few statements (:meth:`Writes._merge`).

Every statement is built once, here; parameters are bound per call.

A merge writes one kind of row it did not lock in the lock phase (module doc of
:mod:`router.store`): the contacts merged into a loser earlier, which it repoints
to the survivor. It takes them with ``NOWAIT`` (:func:`lock_merged_into`): a
transaction that waits for a row out of the lock order can close a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import sql
from sqlalchemy import (
    BindParameter,
    Connection,
    DateTime,
    Insert,
    String,
    Table,
    Uuid,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy import exc as sa
from sqlalchemy.dialects import postgresql, sqlite

from router.tables import (
    contacts,
    conversations,
    dedupe_keys,
    identities,
    inboxes,
    merge_items,
    merges,
    messages,
    outbox,
    owners,
)
from switchboard.consumer import Outage

_TS = DateTime(timezone=True)
# Bound parameters of the executemany updates: named apart from the columns they set.
_SET_OWNER = (
    update(contacts)
    .where(contacts.c.id == bindparam("b_id"))
    .values(owner=bindparam("b_owner"), updated_at=bindparam("b_now"))
)
# Every conversation carries its contact's owner (ix_conversations_owner_last: an
# agent's open conversations are counted from the index, not from a join of every
# conversation with every contact).
_CONVERSATIONS_OWNER = (
    update(conversations)
    .where(conversations.c.contact_id == bindparam("b_id"))
    .values(owner=bindparam("b_owner"))
)
_SET_CURSOR = (
    update(owners)
    .where(owners.c.name == bindparam("b_name"))
    .values(rr_next=bindparam("b_next"), updated_at=bindparam("b_now"))
)
_ids: BindParameter[Any] = bindparam("ids", expanding=True)
# What merged contacts have: (kind, ref, whose), one statement for every merge of a batch.
_HAD = union_all(
    *(
        select(
            literal(kind, String).label("kind"), cast(ref, String(400)).label("ref"), whose
        ).where(whose.in_(_ids))
        for kind, ref, whose in (
            ("identity", identities.c.key, identities.c.contact_id),
            ("conversation", conversations.c.id, conversations.c.contact_id),
            ("message", messages.c.id, messages.c.contact_id),
            ("contact", contacts.c.id, contacts.c.merged_into),
        )
    )
)
_to: BindParameter[Any] = bindparam("b_to")
_MOVE = tuple(
    update(table)
    .where(table.c.contact_id == bindparam("b_from"))
    .values(
        contact_id=_to,
        # A conversation takes its survivor's owner (see _CONVERSATIONS_OWNER).
        **(
            {"owner": select(contacts.c.owner).where(contacts.c.id == _to).scalar_subquery()}
            if table is conversations
            else {}
        ),
    )
    for table in (identities, conversations, messages)
)
# Contacts merged into a loser earlier point at the survivor directly, so following
# a merge is always one step.
_REPOINT = (
    update(contacts)
    .where(contacts.c.merged_into == bindparam("b_from"))
    .values(merged_into=bindparam("b_to"))
)
_MERGED = (
    update(contacts)
    .where(contacts.c.id == bindparam("b_from"))
    .values(
        merged_into=bindparam("b_to"), merged_at=bindparam("b_at"), updated_at=bindparam("b_at")
    )
)
# The contacts merged into the given ones, locked by id without waiting (see the
# module doc); a row held by another transaction fails the statement at once.
_LOCK_MERGED_INTO = text(
    "SELECT id FROM contacts WHERE merged_into = ANY(CAST(:ids AS uuid[]))"
    " ORDER BY id FOR UPDATE NOWAIT"
)
_LOCK_NOT_AVAILABLE = "55P03"
_FORGET_KEYS = delete(dedupe_keys).where(dedupe_keys.c.key.in_(bindparam("keys", expanding=True)))


class Conflict(Outage):
    """Another router or an agent changed what this batch locked (a contact merged
    meanwhile), or holds a row a merge must write: roll back and route the batch
    (or do the agent's action) again."""


def lock_merged_into(c: Connection, ids: Sequence[UUID]) -> None:
    """Lock the contacts merged into ``ids`` (which the caller holds), the rows a
    merge repoints and an unmerge takes back, without waiting: their locks come
    after the lock phase, out of its order, so waiting for one can deadlock. Who
    else holds such a row holds it briefly: a router that locked a contact just
    merged away (it finds it merged and restarts), or an agent's unmerge of that
    contact waiting for ``ids``; either way :class:`Conflict`, and the caller's
    transaction starts again. SQLite has a single writer: nothing to do there."""
    if c.dialect.name != "postgresql" or not ids:
        return
    try:
        c.execute(_LOCK_MERGED_INTO, {"ids": sorted(ids)})
    except sa.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            raise Conflict("a contact merged into a merging one is held by another") from exc
        raise


def _touch_sqlite() -> Any:  # noqa: ANN401 - an Update
    """A conversation's later messages: the newest time and the count; the time is
    the greatest of the row's and the batch's (a late arrival does not move a
    conversation back). SQLite runs an executemany in process."""
    return (
        update(conversations)
        .where(conversations.c.id == bindparam("b_id"))
        .values(
            last_message_at=func.max(
                conversations.c.last_message_at, bindparam("b_last", type_=_TS)
            ),
            message_count=conversations.c.message_count + bindparam("b_count"),
        )
    )


# PostgreSQL: one statement for many rows, with the rows as arrays (unnest): an
# executemany would run one statement per row on the server, and a VALUES list
# costs more to build and parse than the rows it carries. Written once, as text.
_TOUCH_POSTGRESQL = text(
    "UPDATE conversations SET"
    " last_message_at = greatest(conversations.last_message_at, t.last),"
    " message_count = conversations.message_count + t.n"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:lasts AS timestamptz[]), CAST(:ns AS int[]))"
    " AS t(id, last, n) WHERE conversations.id = t.id"
)
_MOVE_POSTGRESQL = (
    text(
        "UPDATE contact_identities SET contact_id = m.b_to"
        " FROM unnest(CAST(:froms AS uuid[]), CAST(:tos AS uuid[]), CAST(:ats AS timestamptz[]))"
        " AS m(b_from, b_to, b_at) WHERE contact_identities.contact_id = m.b_from"
    ),
    text(
        "UPDATE conversations SET contact_id = m.b_to, owner = s.owner"
        " FROM unnest(CAST(:froms AS uuid[]), CAST(:tos AS uuid[]), CAST(:ats AS timestamptz[]))"
        " AS m(b_from, b_to, b_at) JOIN contacts s ON s.id = m.b_to"
        " WHERE conversations.contact_id = m.b_from"
    ),
    text(
        "UPDATE messages SET contact_id = m.b_to"
        " FROM unnest(CAST(:froms AS uuid[]), CAST(:tos AS uuid[]), CAST(:ats AS timestamptz[]))"
        " AS m(b_from, b_to, b_at) WHERE messages.contact_id = m.b_from"
    ),
    text(
        "UPDATE contacts SET merged_into = m.b_to"
        " FROM unnest(CAST(:froms AS uuid[]), CAST(:tos AS uuid[]), CAST(:ats AS timestamptz[]))"
        " AS m(b_from, b_to, b_at) WHERE contacts.merged_into = m.b_from"
    ),
    text(
        "UPDATE contacts SET merged_into = m.b_to, merged_at = m.b_at, updated_at = m.b_at"
        " FROM unnest(CAST(:froms AS uuid[]), CAST(:tos AS uuid[]), CAST(:ats AS timestamptz[]))"
        " AS m(b_from, b_to, b_at) WHERE contacts.id = m.b_from"
    ),
)


_TOUCH_SQLITE = _touch_sqlite()


def _insert_ignoring(table: Table, dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING``: a second arrival of a message adds
    the inboxes it was not seen in yet, whether the first is in the table already
    or in this batch."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


_INBOXES = {name: _insert_ignoring(inboxes, name) for name in ("postgresql", "sqlite")}


def _copy(c: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """PostgreSQL: rows into a table with ``COPY ... FROM STDIN``, one statement
    whatever their number (an executemany runs one statement per row on the server;
    a multi-row ``INSERT`` costs more to build and parse than the rows it carries)."""
    names = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, names))
    )
    raw = c.connection.driver_connection
    if raw is None:  # pragma: no cover - an open transaction has its driver connection
        raise RuntimeError("no driver connection")
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[name] for name in names])


# How a column's values become SQLite parameters: "uuid" and "datetime" inline the
# conversions SQLAlchemy's bind processors make (the same text, checked by
# tests/unit/test_router_writes.py), anything else through its bind processor.
_Convert = Callable[[Any], Any] | None
_Plan = tuple[str, tuple[tuple[str, str, _Convert], ...]]
_SQLITE_PLANS: dict[tuple[str, Table, tuple[str, ...]], _Plan] = {}
# SQLAlchemy's storage format for SQLite DATETIME, which datetime.isoformat matches.
_SQLITE_DATETIME = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)


def _sqlite_kind(type_: Any, dialect: Any) -> tuple[str, _Convert]:  # noqa: ANN401 - types
    impl = type_.dialect_impl(dialect)
    convert = impl.bind_processor(dialect)
    if isinstance(type_, Uuid) and type_.as_uuid and convert is not None:
        return "uuid", convert
    if isinstance(type_, DateTime) and getattr(impl, "_storage_format", None) == _SQLITE_DATETIME:
        return "datetime", convert
    return "plain" if convert is None else "other", convert


def _sqlite_column(values: list[Any], kind: str, convert: _Convert) -> list[Any]:
    """One column's values as SQLite takes them, column by column: one list
    comprehension per column instead of a Python call per value."""
    if kind == "uuid":
        return [None if v is None else v.hex for v in values]
    if kind == "datetime" and convert is not None:
        return [
            None
            if v is None
            else v.isoformat(" ", "microseconds")[:26]
            if type(v) is datetime
            else convert(v)
            for v in values
        ]
    if convert is None:
        return values
    return list(map(convert, values))


def _sqlite_insert(c: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """SQLite: rows into a table with one ``executemany`` of positional tuples, each
    value converted as its column's bind processor converts it (the one SQLAlchemy
    applies), without SQLAlchemy's per-row parameter bookkeeping: measured, that
    bookkeeping cost more than SQLite's own insert of the row."""
    names = tuple(rows[0])
    key = (c.dialect.driver, table, names)
    plan = _SQLITE_PLANS.get(key)
    if plan is None:
        compiled = insert(table).compile(dialect=c.dialect, column_keys=list(names))
        order = compiled.positiontup or []
        plan = (
            str(compiled),
            tuple((name, *_sqlite_kind(table.c[name].type, c.dialect)) for name in order),
        )
        _SQLITE_PLANS[key] = plan
    statement, columns = plan
    values = [
        _sqlite_column([row[name] for row in rows], kind, convert)
        for name, kind, convert in columns
    ]
    c.exec_driver_sql(statement, list(zip(*values, strict=True)))


def chunks(values: Sequence[Any], size: int = 1000) -> Iterator[Sequence[Any]]:
    """An ``IN`` list in pieces a driver takes (a hostile message may carry 600
    thread ids; a batch of them, far more parameters than one statement allows)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass(frozen=True)
class Merge:
    """One contact merged into another; everything it has at that point of the
    batch is recorded (``contact_merge_items``, for an unmerge) and moves."""

    id: UUID
    survivor: UUID
    merged: UUID
    at: datetime
    message_id: UUID | None = None
    by: str | None = None


@dataclass
class ConversationTouch:
    last_message_at: datetime
    count: int = 0


@dataclass
class Writes:
    """The rows one batch writes, in the order :meth:`flush` sends them."""

    contacts: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    owners_changed: dict[UUID, str] = field(default_factory=dict)
    identities: list[dict[str, Any]] = field(default_factory=list)
    conversations: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    touched: dict[UUID, ConversationTouch] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    inboxes: dict[tuple[UUID, str], datetime] = field(default_factory=dict)
    forget: set[str] = field(default_factory=set)  # expired dedupe keys seen again
    dedupe: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    merges: list[Merge] = field(default_factory=list)
    copies: int = 0  # COPY statements sent (the driver's, unseen by SQLAlchemy's events)

    # -- what a decision writes -------------------------------------------------

    def new_contact(self, contact_id: UUID, owner: str, now: datetime) -> None:
        self.contacts[contact_id] = {
            "id": contact_id,
            "created_at": now,
            "owner": owner,
            "updated_at": now,
        }

    def set_owner(self, contact_id: UUID, owner: str, now: datetime) -> None:
        row = self.contacts.get(contact_id)
        if row is not None:  # created in this batch and not flushed yet
            row.update(owner=owner, updated_at=now)
        else:
            self.owners_changed[contact_id] = owner

    def link(self, contact_id: UUID, keys: Iterable[str], message_id: UUID, now: datetime) -> None:
        self.identities.extend(
            {
                "key": key,
                "contact_id": contact_id,
                "kind": key.split(":", 1)[0],
                "linked_at": now,
                "message_id": message_id,
            }
            for key in keys
        )

    def new_conversation(
        self, conversation_id: UUID, contact_id: UUID, owner: str, at: datetime
    ) -> None:
        """``owner``: the contact's now; a later owner change of the batch reaches
        the row in :meth:`flush`."""
        self.conversations[conversation_id] = {
            "id": conversation_id,
            "contact_id": contact_id,
            "started_at": at,
            "last_message_at": at,
            "message_count": 1,
            "owner": owner,
        }

    def add_to_conversation(self, conversation_id: UUID, at: datetime) -> None:
        row = self.conversations.get(conversation_id)
        if row is not None:
            row["last_message_at"] = max(row["last_message_at"], at)
            row["message_count"] += 1
            return
        touch = self.touched.setdefault(conversation_id, ConversationTouch(at))
        touch.last_message_at = max(touch.last_message_at, at)
        touch.count += 1

    def add_inboxes(self, message_id: UUID, keys: Iterable[str], now: datetime) -> None:
        for key in keys:
            self.inboxes.setdefault((message_id, key), now)

    def cursor(self, team: str, value: int) -> None:
        self.cursors[team] = value

    # -- sending them -----------------------------------------------------------

    def _insert(self, c: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if c.dialect.name == "postgresql":
            _copy(c, table, rows)
            self.copies += 1
        else:
            _sqlite_insert(c, table, rows)

    def flush(self, c: Connection, now: datetime) -> dict[UUID, list[str]]:
        """Send everything held back, parents before children, then the merges, and
        forget it; returns the identity keys each merge moved (by merge id)."""
        dialect = c.dialect.name
        self._insert(c, contacts, list(self.contacts.values()))
        owners_changed = [
            {"b_id": i, "b_owner": o, "b_now": now} for i, o in self.owners_changed.items()
        ]
        if owners_changed:
            c.execute(_SET_OWNER, owners_changed)
        self._insert(c, identities, self.identities)
        for row in self.conversations.values():  # its contact's owner at the batch's end
            if (new := self.contacts.get(row["contact_id"])) is not None:
                row["owner"] = new["owner"]
        self._insert(c, conversations, list(self.conversations.values()))
        if owners_changed:  # existing contacts: their conversations, new ones included
            c.execute(_CONVERSATIONS_OWNER, owners_changed)
        if self.touched:
            self._touch(c)
        self._insert(c, messages, self.messages)
        if self.inboxes:
            rows = [
                {"message_id": m, "inbox": k, "first_seen_at": at}
                for (m, k), at in self.inboxes.items()
            ]
            c.execute(_INBOXES[dialect], rows)
        for keys in chunks(sorted(self.forget)):
            c.execute(_FORGET_KEYS, {"keys": list(keys)})
        self._insert(c, dedupe_keys, self.dedupe)
        self._insert(c, outbox, self.events)
        if self.cursors:
            rows = [{"b_name": t, "b_next": n, "b_now": now} for t, n in self.cursors.items()]
            c.execute(_SET_CURSOR, rows)
        moved = self._merge(c) if self.merges else {}
        self.clear()
        return moved

    def _touch(self, c: Connection) -> None:
        rows = [
            {"b_id": i, "b_last": t.last_message_at, "b_count": t.count}
            for i, t in self.touched.items()
        ]
        if c.dialect.name == "postgresql":
            arrays = {
                "ids": [r["b_id"] for r in rows],
                "lasts": [r["b_last"] for r in rows],
                "ns": [r["b_count"] for r in rows],
            }
            c.execute(_TOUCH_POSTGRESQL, arrays)
        else:
            c.execute(_TOUCH_SQLITE, rows)

    def _merge(self, c: Connection) -> dict[UUID, list[str]]:
        """The batch's merges, in their order, in a few statements whatever their
        number: what each merged contact had when it was merged (its own rows, and
        those an earlier merge of the batch gave it) is worked out in memory from
        one read, then the rows move to their final survivors."""
        losers = sorted({m.merged for m in self.merges})
        owned: dict[UUID, dict[str, set[str]]] = {}
        for part in chunks(losers):
            for kind, ref, whose in c.execute(_HAD, {"ids": list(part)}):
                owned.setdefault(whose, {}).setdefault(kind, set()).add(
                    ref if kind == "identity" else str(UUID(ref))
                )
        items: list[dict[str, Any]] = []
        moved: dict[UUID, list[str]] = {}
        final: dict[UUID, UUID] = {}
        for merge in self.merges:
            had = owned.pop(merge.merged, {})
            items.extend(
                {"merge_id": merge.id, "kind": kind, "ref": ref}
                for kind, refs in sorted(had.items())
                for ref in sorted(refs)
            )
            moved[merge.id] = sorted(had.get("identity", ()))
            theirs = owned.setdefault(merge.survivor, {})
            for kind, refs in had.items():
                theirs.setdefault(kind, set()).update(refs)
            theirs.setdefault("contact", set()).add(str(merge.merged))
            final[merge.merged] = merge.survivor
        for loser in list(final):
            last = final[loser]
            while last in final:
                last = final[last]
            final[loser] = last
        self._insert(
            c,
            merges,
            [
                {
                    "id": m.id,
                    "survivor_id": m.survivor,
                    "merged_id": m.merged,
                    "merged_at": m.at,
                    "by": m.by,
                    "message_id": m.message_id,
                }
                for m in self.merges
            ],
        )
        self._insert(c, merge_items, items)
        pairs = [{"b_from": loser, "b_to": survivor} for loser, survivor in final.items()]
        at = {m.merged: m.at for m in self.merges}
        if c.dialect.name == "postgresql":
            lock_merged_into(c, losers)
            arrays = {
                "froms": [p["b_from"] for p in pairs],
                "tos": [p["b_to"] for p in pairs],
                "ats": [at[p["b_from"]] for p in pairs],
            }
            for moving in _MOVE_POSTGRESQL:
                c.execute(moving, arrays)
        else:
            for statement in (*_MOVE, _REPOINT):
                c.execute(statement, pairs)
            c.execute(_MERGED, [{**pair, "b_at": at[pair["b_from"]]} for pair in pairs])
        return moved

    def clear(self) -> None:
        for held in (
            self.contacts,
            self.owners_changed,
            self.identities,
            self.conversations,
            self.touched,
            self.messages,
            self.inboxes,
            self.forget,
            self.dedupe,
            self.events,
            self.cursors,
            self.merges,
        ):
            held.clear()
