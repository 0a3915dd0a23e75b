"""What the router's contact.unmerged says about the contacts merged in before."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert

from normalize.schema import ContactEvent
from router.store import RouterStore
from router.tables import contacts
from switchboard.databases import upgrade
from switchboard.db import make_engine
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
