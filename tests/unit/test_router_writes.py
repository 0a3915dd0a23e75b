"""The router's SQLite bulk insert converts values as SQLAlchemy's bind processors
do (it inlines the common ones), so rows read back the same whichever wrote them."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from router.tables import contacts, conversations, metadata, outbox
from router.writes import Writes, _sqlite_column, _sqlite_insert, _sqlite_kind
from switchboard.db import make_engine

TIMES = [
    datetime(2026, 11, 29, 17, 0, 0, tzinfo=UTC),  # no microseconds: isoformat would drop them
    datetime(2026, 11, 29, 17, 0, 0, 123456, tzinfo=UTC),
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=3))),  # year below 1000
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))),
    None,
]


def test_inlined_conversions_match_the_bind_processors(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    dialect = engine.dialect
    for column, values in (
        (contacts.c.id, [uuid.uuid4(), uuid.UUID(int=0), None]),
        (contacts.c.created_at, [*TIMES, date(2026, 1, 2)]),
    ):
        kind, convert = _sqlite_kind(column.type, dialect)
        assert kind in ("uuid", "datetime")
        assert convert is not None
        assert _sqlite_column(list(values), kind, convert) == [convert(v) for v in values]


def test_bulk_insert_reads_back_like_sqlalchemys_own_insert(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    metadata.create_all(engine, tables=[outbox])
    rows = [
        {
            "id": uuid.uuid4(),
            "message_id": uuid.uuid4() if n % 2 else None,
            "seq": n,
            "topic": "t",
            "key": f"k{n}",
            "type": "x",
            "source": "s",
            "time": TIMES[n % 4],
            "data": b"{}",
            "pending": bool(n % 3),
        }
        for n in range(8)
    ]
    with engine.begin() as c:
        _sqlite_insert(c, outbox, rows[:4])
        c.execute(insert(outbox), rows[4:])
        stored = {r.seq: r for r in c.execute(select(outbox))}
    with engine.begin() as c:
        c.execute(outbox.delete())
        c.execute(insert(outbox), rows[:4])
        expected = {r.seq: r for r in c.execute(select(outbox))}
    for n in range(4):
        assert tuple(stored[n]) == tuple(expected[n])


@pytest.mark.parametrize("bad", ["not a time", 12])
def test_other_values_still_meet_the_bind_processor(tmp_path: Path, bad: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    kind, convert = _sqlite_kind(contacts.c.created_at.type, engine.dialect)
    with pytest.raises(TypeError):
        _sqlite_column([bad], kind, convert)


def test_a_conversation_is_written_with_its_contacts_owner_at_the_batchs_end(
    tmp_path: Path,
) -> None:
    """Conversations carry their contact's owner (counted by least-loaded teams): a
    change of owner later in the batch reaches the rows the batch inserts, for a
    contact new in the batch and for one already stored."""
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    metadata.create_all(engine, tables=[contacts, conversations])
    now = TIMES[1]
    assert now is not None
    stored, new = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as c:
        c.execute(
            insert(contacts),
            {"id": stored, "created_at": now, "owner": "dave", "updated_at": now},
        )
    writes = Writes()
    writes.new_contact(new, "alice", now)
    first, second = uuid.uuid4(), uuid.uuid4()
    writes.new_conversation(first, new, "alice", now)
    writes.new_conversation(second, stored, "dave", now)
    writes.set_owner(new, "bob", now)
    writes.set_owner(stored, "carol", now)
    with engine.begin() as c:
        writes.flush(c, now)
        owners = dict(c.execute(select(conversations.c.id, conversations.c.owner)).all())
        contact_owners = dict(c.execute(select(contacts.c.id, contacts.c.owner)).all())
    assert owners == {first: "bob", second: "carol"}
    assert contact_owners == {new: "bob", stored: "carol"}
