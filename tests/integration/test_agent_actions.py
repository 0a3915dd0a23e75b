"""What the router records for an agent's actions: the contacts an unmerge takes
back, a reassignment that waited for a contact a router was merging."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select, update

from normalize.schema import ContactEvent
from router.store import RouterStore
from router.tables import contacts
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import Event
from tests.router_helpers import store_for, survivor_of

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_schema_url")
        made = make_engine(url)
    else:
        made = make_engine(f"sqlite:///{tmp_path / 'router.db'}", sqlite_immediate=True)
    upgrade(made)
    yield made
    made.dispose()


def _contacts(engine: Engine, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    now = datetime.now(UTC)
    with engine.begin() as c:
        c.execute(
            insert(contacts),
            [{"id": i, "created_at": now, "owner": "alice", "updated_at": now} for i in ids],
        )
    return ids


def _data(store: RouterStore, survivor: uuid.UUID, merged: uuid.UUID) -> ContactEvent:
    event = store.unmerge(survivor, merged, by="alice")
    assert isinstance(event.data, ContactEvent)
    return event.data


def test_an_unmerge_lists_only_the_contacts_that_follow_it_back(engine: Engine) -> None:
    """e merged into r, r into s (e now points at s); e unmerged; then r unmerged.
    The event listed e among the contacts that follow r back although e had been
    freed, and every read model then merged e into r again (found by a review)."""
    e, r, s = _contacts(engine, 3)
    store = store_for(engine)
    store.merge(r, e, by="alice")
    store.merge(s, r, by="alice")
    assert survivor_of(engine, e) == s
    freed = _data(store, s, e)
    assert freed.contact_id == e
    back = _data(store, s, r)
    assert back.contact_id == r
    assert back.merged_contact_ids == ()
    assert survivor_of(engine, e) == e
    assert survivor_of(engine, r) == r


def test_an_unmerge_lists_the_contacts_that_follow_it_back(engine: Engine) -> None:
    """e merged into r, r into s: unmerging r takes e back with it, and says so."""
    e, r, s = _contacts(engine, 3)
    store = store_for(engine)
    store.merge(r, e, by="alice")
    store.merge(s, r, by="alice")
    back = _data(store, s, r)
    assert back.merged_contact_ids == (e,)
    assert survivor_of(engine, e) == r


def test_a_reassignment_that_waited_for_a_merge_goes_to_the_survivor(
    request: pytest.FixtureRequest,
) -> None:
    """A router merges b into a while an agent reassigns b: the reassignment waits for
    b's row, then finds b merged. It gave the owner to the merged-away row and named
    it in owner.assigned (found by a review); now it goes to a. PostgreSQL only:
    SQLite's writers take the database's lock up front, so they cannot interleave."""
    url = request.getfixturevalue("postgres_schema_url")
    engine = make_engine(url)
    try:
        upgrade(engine)
        a, b = _contacts(engine, 2)
        store = store_for(engine)
        answers: list[object] = []
        with engine.connect() as merging:
            tx = merging.begin()
            merging.execute(select(contacts.c.id).where(contacts.c.id == b).with_for_update())
            merging.execute(update(contacts).where(contacts.c.id == b).values(merged_into=a))
            agent = threading.Thread(target=lambda: answers.append(store.assign(b, "bob")))
            agent.start()
            time.sleep(0.5)  # the reassignment is waiting for b's row now
            assert agent.is_alive()
            tx.commit()
            agent.join(10)
        event = answers[0]
        assert isinstance(event, Event)
        assert isinstance(event.data, ContactEvent)
        assert (event.data.contact_id, event.data.owner) == (a, "bob")
        with engine.connect() as c:
            owners = dict(c.execute(select(contacts.c.id, contacts.c.owner)).all())
        assert owners[a] == "bob"
    finally:
        engine.dispose()
