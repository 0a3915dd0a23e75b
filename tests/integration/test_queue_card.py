"""The customer card's actions against the real router directory and broker, on
SQLite and PostgreSQL (issue 18): reassign by API (an agent's personal token) and
by the page's form, merge and unmerge by the page's buttons, each recorded as the
agent who did it where the event has room for it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from normalize.identity import email_identity, phone_identity
from router.tables import outbox
from sinks.agents import AgentStore
from sinks.api import install_denied_handler, queue_router
from sinks.auth import Access
from sinks.queue import QueueSink, QueueStore, q_contacts, q_conversations
from switchboard.blobs import FileBlobStore
from switchboard.http import Readiness, create_app
from switchboard.kafka import Publisher
from switchboard.settings import KafkaSettings
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


@dataclass
class _Desk:
    """The router, the queue sink and the queue's page and API on a fresh broker."""

    kafka: KafkaSettings
    engine: Engine
    queue: QueueStore
    agents: AgentStore
    base: str

    def signed_in(self, name: str) -> tuple[httpx.Client, dict[str, str], dict[str, str]]:
        """A page session of ``name`` (password ``<name>-password``), the card form's
        CSRF field, and the same-origin header its posts need."""
        client = httpx.Client(base_url=self.base, timeout=15)
        login = {"name": name, "password": f"{name}-password"}
        assert client.post("/queue/login", data=login).status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/queue").text)
        assert csrf
        return client, {"csrf": csrf.group(1)}, {"origin": self.base}


@contextmanager
def _desk(databases: Any, tmp_path: Any) -> Iterator[_Desk]:  # noqa: ANN401
    engine = databases()
    with fresh_kafka() as kafka:
        queue = QueueStore(engine, {"support": ("alice", "bob", "carol")})
        agents = AgentStore(engine, ["alice", "bob", "carol"], hasher=FAST)
        agents.set_password("alice", "alice-password")
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
                yield _Desk(kafka, engine, queue, agents, base)
        finally:
            publisher.close()


@pytest.mark.slow
def test_reassign_merge_and_unmerge_from_the_card(databases: Any, tmp_path: Any) -> None:  # noqa: ANN401
    with _desk(databases, tmp_path) as desk:
        kafka, engine, queue, base = desk.kafka, desk.engine, desk.queue, desk.base
        bob_token = desk.agents.issue_token("bob")
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
        (assigned,) = [e for e in _recorded(engine, "owner.assigned") if e["owner"] == "bob"]
        assert (assigned["contact_id"], assigned["reason"], assigned["by"]) == (
            a,
            "manual",
            "bob",
        )

        alice, form, same = desk.signed_in("alice")
        with closing(alice):
            merged = alice.post(
                f"/queue/contacts/{a}/merge", data={**form, "contact_id": b}, headers=same
            )
            assert merged.status_code == 303, merged.text
            one = alice.get(f"/api/contacts/{a}/card").json()
            assert len(one["conversations"]) == 2
            assert one["open_conversations"] == 2
            assert [m["id"] for m in one["merged_contacts"]] == [b]
            assert 'class="unmerge"' in alice.get(f"/queue/contacts/{a}").text
            assert 'id="merged-from"' not in alice.get(f"/queue/contacts/{a}").text
            # The merged contact's old link: the survivor's card, saying so.
            assert f"Contact {b[:8]}, the one this link names, was merged" in (
                alice.get(f"/queue/contacts/{b}").text
            )
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


#: A merge form of the card: the contact that survives, and the one merged into it.
MERGE_FORM = re.compile(
    r'action="/queue/contacts/(?P<into>[0-9a-f-]+)/merge" class="actions">'
    r'<input type="hidden" name="csrf" value="[^"]+">'
    r'<input type="hidden" name="contact_id" value="(?P<away>[0-9a-f-]+)">'
)


@pytest.mark.slow
def test_a_suggested_merge_keeps_the_customer_whose_identity_was_claimed(
    databases: Any,  # noqa: ANN401
    tmp_path: Any,  # noqa: ANN401
) -> None:
    """A stranger's form post names a new address and a customer's verified phone:
    a new contact, and a suggestion. Its card said the customer "also wrote as" the
    phone, "unverified", and its button merged the customer into the stranger's
    contact, which survived with the customer's history (review, 2026-12-01). Now
    either card merges the claimant into the customer, and says who claimed what."""
    with _desk(databases, tmp_path) as desk:
        stranger = email_identity("mallet@evil.example")
        publish(desk.kafka, [_message(PHONE, 0)])
        _until(lambda: len(desk.queue.rows()["queue_messages"]) == 1)
        publish(desk.kafka, [_message(stranger, 1, phone_identity(PHONE.value))])
        _until(lambda: len(desk.queue.rows()["queue_merge_suggestions"]) == 1)
        customer = desk.queue.contact_by_identity(PHONE.key)["id"]
        claimant = desk.queue.contact_by_identity(stranger.key)["id"]
        assert customer != claimant
        alice, form, same = desk.signed_in("alice")
        with closing(alice):
            (suggestion,) = alice.get(f"/api/contacts/{claimant}").json()["merge_suggestions"]
            assert suggestion["claimant_contact_id"] == claimant
            assert suggestion["holder_contact_id"] == customer
            assert suggestion["other_contact_id"] == customer
            here = alice.get(f"/queue/contacts/{claimant}").text
            there = alice.get(f"/queue/contacts/{customer}").text
            assert "also wrote as" not in here + there
            assert 'class="claimed-here"' in here
            assert f'it belongs to contact <a href="/queue/contacts/{customer}">' in here
            assert 'class="claimed-elsewhere"' in there
            # Both buttons merge the claimant into the customer.
            for page in (here, there):
                found = MERGE_FORM.search(page)
                assert found, page
                assert (found["into"], found["away"]) == (customer, claimant)
            merged = alice.post(
                f"/queue/contacts/{customer}/merge",
                data={**form, "contact_id": claimant},
                headers=same,
            )
            assert merged.status_code == 303, merged.text
            assert merged.headers["location"] == f"/queue/contacts/{customer}"
            card = alice.get(f"/api/contacts/{claimant}/card").json()
            assert card["id"] == customer  # the merged id answers with the customer
            assert [m["id"] for m in card["merged_contacts"]] == [claimant]
