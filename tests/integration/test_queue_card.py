"""The customer card's actions against the real router directory and broker, on
SQLite and PostgreSQL (issue 18): reassign by API (an agent's personal token) and
by the page's form, merge and unmerge by the page's buttons, each recorded as the
agent who did it where the event has room for it."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from router.tables import outbox
from sinks.agents import AgentStore
from sinks.api import install_denied_handler, queue_router
from sinks.auth import Access
from sinks.queue import QueueSink, QueueStore, q_contacts, q_conversations
from switchboard.blobs import FileBlobStore
from switchboard.http import Readiness, create_app
from switchboard.kafka import Publisher
from tests.integration.test_agent_merge import EMAIL, PHONE, _message, databases
from tests.integration.test_queue import _serving, _until, running_sink
from tests.integration.test_queue_customers import FAST
from tests.router_helpers import fresh_kafka, publish, running_router, store_for

pytestmark = pytest.mark.integration

__all__ = ["databases"]  # the fixture, used here too

TOKEN = "card-admin-token"


def _recorded(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        rows = c.execute(select(outbox.c.type, outbox.c.data).order_by(outbox.c.time)).all()
    return [json.loads(row.data) for row in rows if row.type.endswith(f".{kind}.v1")]


def assert_work_follows_conversations(queue: QueueStore) -> None:
    """Each contact's kept work equals what its conversations say now."""
    with queue.engine.connect() as c:
        conversations = c.execute(select(q_conversations)).all()
        contacts = c.execute(select(q_contacts)).all()
    for row in contacts:
        mine = [v for v in conversations if v.contact_id == row.id]
        opened = [v for v in mine if v.status == "open"]
        work = (
            "open"
            if opened
            else "waiting"
            if any(v.status == "waiting" for v in mine)
            else "closed"
            if mine
            else None
        )
        assert (row.work, row.open_count) == (work, len(opened)), row.id


@pytest.mark.slow
def test_reassign_merge_and_unmerge_from_the_card(databases: Any, tmp_path: Any) -> None:  # noqa: ANN401
    engine = databases()
    with fresh_kafka() as kafka:
        queue = QueueStore(engine, {"support": ("alice", "bob", "carol")})
        agents = AgentStore(engine, ["alice", "bob", "carol"], hasher=FAST)
        agents.set_password("alice", "alice-password")
        bob_token = agents.issue_token("bob")
        sink = QueueSink(kafka, queue, group_id="card-test")
        router_store = store_for(engine)
        publisher = Publisher(kafka)
        app = create_app(Readiness())
        access = Access(TOKEN, agents)
        app.include_router(
            queue_router(queue, FileBlobStore(tmp_path), publisher, access, router_store)
        )
        install_denied_handler(app)
        try:
            with (
                running_router(kafka, router_store),
                running_sink(sink),
                _serving(app) as base,
            ):
                publish(kafka, [_message(EMAIL, 0), _message(PHONE, 1)])
                _until(lambda: len(queue.rows()["queue_messages"]) == 2)
                a = queue.contact_by_identity(EMAIL.key)["id"]
                b = queue.contact_by_identity(PHONE.key)["id"]
                assert a != b

                with httpx.Client(
                    base_url=base, headers={"authorization": f"Bearer {bob_token}"}, timeout=15
                ) as bob:
                    wrong = bob.post(f"/api/contacts/{a}/owner", json={"owner": "nobody"})
                    assert wrong.status_code == 422
                    assert "'nobody'" in wrong.json()["detail"]
                    missing = bob.post(f"/api/contacts/{uuid.uuid4()}/owner", json={"owner": "bob"})
                    assert missing.status_code == 404
                    moved = bob.post(f"/api/contacts/{a}/owner", json={"owner": "bob"})
                    assert moved.status_code == 200, moved.text
                    assert (moved.json()["owner"], moved.json()["by"]) == ("bob", "bob")
                    assert moved.json()["contact"]["owner"] == "bob"
                    assert a in [i["contact_id"] for i in bob.get("/api/queue").json()["items"]]
                (assigned,) = [
                    e for e in _recorded(engine, "owner.assigned") if e["owner"] == "bob"
                ]
                assert (assigned["contact_id"], assigned["reason"], assigned["by"]) == (
                    a,
                    "manual",
                    "bob",
                )

                with httpx.Client(base_url=base, timeout=15) as alice:
                    login = {"name": "alice", "password": "alice-password"}
                    assert alice.post("/queue/login", data=login).status_code == 303
                    card = alice.get(f"/queue/contacts/{a}").text
                    csrf = re.search(r'name="csrf" value="([^"]+)"', card)
                    assert csrf
                    form = {"csrf": csrf.group(1)}
                    same = {"origin": base}
                    merged = alice.post(
                        f"/queue/contacts/{a}/merge", data={**form, "contact_id": b}, headers=same
                    )
                    assert merged.status_code == 303, merged.text
                    one = alice.get(f"/api/contacts/{a}/card").json()
                    assert len(one["conversations"]) == 2
                    assert one["open_conversations"] == 2
                    assert [m["id"] for m in one["merged_contacts"]] == [b]
                    assert 'class="unmerge"' in alice.get(f"/queue/contacts/{a}").text
                    (merge,) = _recorded(engine, "contact.merged")
                    assert merge["by"] == "alice"
                    owned = alice.post(
                        f"/queue/contacts/{a}/owner", data={**form, "owner": "carol"}, headers=same
                    )
                    assert owned.status_code == 303
                    assert queue.contact(uuid.UUID(a))["owner"] == "carol"
                    undone = alice.post(
                        f"/queue/contacts/{a}/unmerge", data={**form, "contact_id": b}, headers=same
                    )
                    assert undone.status_code == 303
                    assert undone.headers["location"] == f"/queue/contacts/{b}"
                    (unmerge,) = _recorded(engine, "contact.unmerged")
                    assert unmerge["by"] == "alice"
                    assert len(alice.get(f"/api/contacts/{a}/card").json()["conversations"]) == 1
                    # A refused action is shown on the page with its reason.
                    again = alice.post(
                        f"/queue/contacts/{a}/unmerge", data={**form, "contact_id": b}, headers=same
                    )
                    assert again.status_code == 409
                    assert "Not available" in again.text
                assert_work_follows_conversations(queue)
        finally:
            publisher.close()
