"""Merge suggestions reach the agent, and an agent can dismiss them (issue 17).

A public form puts Vic's phone next to Wendy's email; the router merges nothing
and suggests; the queue read model lists the suggestion on both contacts; an
agent dismisses it through the API; a rebuild from the topics gives the same
rows. The real router, queue sink, broker, API server and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import Identity, InboundMessage
from sinks.api import install_denied_handler, queue_router
from sinks.queue import QueueSink, QueueStore
from switchboard.blobs import FileBlobStore
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.http import Readiness, create_app
from switchboard.ids import uuid7
from switchboard.kafka import Publisher
from tests.integration.test_queue import _serving, _until, running_sink
from tests.postgres import with_search_path
from tests.router_helpers import fresh_kafka, publish, running_router, store_for

pytestmark = pytest.mark.integration

TOKEN = "suggestions-token"
NOW = datetime.now(UTC) - timedelta(minutes=30)


def _message(sender: Identity, minutes: int, *others: Identity) -> InboundMessage:
    return InboundMessage(
        id=uuid7(),
        channel="webhook" if others else ("sms" if sender.kind == "phone" else "email"),
        adapter="contact-form" if others else "test",
        received_at=NOW + timedelta(minutes=minutes),
        sender=sender,
        identities=others,
        text=f"message {minutes}",
        dedupe_key=f"test:{uuid.uuid4()}",
    )


@pytest.fixture
def schema_engine(postgres_url: str) -> Iterator[Engine]:
    schema = f"s_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_url)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(with_search_path(postgres_url, schema))
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.slow
def test_a_suggestion_is_listed_on_both_contacts_and_can_be_dismissed(
    schema_engine: Engine, tmp_path: Path, postgres_url: str
) -> None:
    wendy = email_identity("wendy@example.org")
    vic = verified(phone_identity("+14155550100"), "twilio-signature")
    with fresh_kafka() as kafka:
        store = QueueStore(schema_engine, {"support": ("alice", "bob")})
        sink = QueueSink(kafka, store, group_id="suggestions-test")
        publisher = Publisher(kafka)
        app = create_app(Readiness())
        app.include_router(queue_router(store, FileBlobStore(tmp_path), publisher, TOKEN))
        install_denied_handler(app)
        headers = {"authorization": f"Bearer {TOKEN}"}
        try:
            with (
                running_router(kafka, store_for(schema_engine)),
                running_sink(sink),
                _serving(app) as base,
            ):
                api = httpx.Client(base_url=base, headers=headers, timeout=10)

                def contact(identity: str) -> dict[str, Any] | None:
                    answer = api.get("/api/contacts", params={"identity": identity})
                    return answer.json() if answer.status_code == 200 else None

                publish(kafka, [_message(wendy, 0)])
                publish(kafka, [_message(vic, 1)])
                _until(lambda: contact("email:wendy@example.org") and contact(vic.key))
                # The stranger's form: Wendy's email with Vic's phone, both claimed.
                publish(kafka, [_message(wendy, 2, phone_identity("+14155550100"))])
                listed = _until(
                    lambda: (contact("email:wendy@example.org") or {}).get("merge_suggestions")
                )
                w, v = contact("email:wendy@example.org"), contact(vic.key)
                assert w is not None
                assert v is not None
                assert w["id"] != v["id"]  # nothing merged
                (suggestion,) = listed
                assert suggestion["other_contact_id"] == v["id"]
                assert suggestion["identity"] == "phone:+14155550100"
                (from_vic,) = v["merge_suggestions"]
                assert from_vic["id"] == suggestion["id"]
                assert from_vic["other_contact_id"] == w["id"]

                missing = api.post(f"/api/merge-suggestions/{uuid.uuid4()}/dismiss", json={})
                assert missing.status_code == 404
                dismissed = api.post(
                    f"/api/merge-suggestions/{suggestion['id']}/dismiss", json={"by": "alice"}
                )
                assert dismissed.status_code == 202, dismissed.text
                assert dismissed.json() == {
                    "id": suggestion["id"],
                    "dismissed": True,
                    "by": "alice",
                }
                assert (contact("email:wendy@example.org") or {})["merge_suggestions"] == []
                assert (contact(vic.key) or {})["merge_suggestions"] == []
                live = store.rows()
                assert len(live["queue_merge_suggestions"]) == 1
        finally:
            publisher.close()

        # A rebuild from the topics keeps the suggestion and its dismissal.
        rebuilt_schema = f"r_{uuid.uuid4().hex[:10]}"
        admin = make_engine(postgres_url)
        with admin.begin() as c:
            c.execute(text(f'CREATE SCHEMA "{rebuilt_schema}"'))
        rebuilt_engine = make_engine(with_search_path(postgres_url, rebuilt_schema))
        try:
            upgrade(rebuilt_engine)
            rebuilt = QueueStore(rebuilt_engine, {"support": ("alice", "bob")})
            replay = QueueSink(kafka, rebuilt, group_id="suggestions-rebuild", rebuild=True)
            with running_sink(replay):
                _until(lambda: replay.applied >= sink.applied)
            assert rebuilt.rows() == live
        finally:
            rebuilt_engine.dispose()
            with admin.begin() as c:
                c.execute(text(f'DROP SCHEMA "{rebuilt_schema}" CASCADE'))
            admin.dispose()
