"""An agent confirms a merge and undoes it (issue 17).

Carol wrote by email and by SMS: two contacts. An agent merges them through the
API; while they are one, Carol writes again on both channels, and her SMS brings
a verified CRM id that links to the merged contact. The agent unmerges: each
contact gets back exactly what it had plus what arrived through its own
identities since, in the router's directory, in the API, and in a read model
rebuilt from the topics. The real router, queue sink, broker and API server, on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, text

from normalize.identity import email_identity, external_identity, phone_identity, verified
from normalize.schema import Identity, InboundMessage
from router.tables import conversations, identities, merges, messages
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
from tests.router_helpers import (
    fresh_kafka,
    publish,
    running_router,
    snapshot,
    store_for,
    survivor_of,
)

pytestmark = pytest.mark.integration

TOKEN = "merge-token"
NOW = datetime.now(UTC) - timedelta(hours=2)
EMAIL = email_identity("carol@example.org")
PHONE = verified(phone_identity("+14155550123"), "twilio-signature")
CRM = verified(external_identity("crm", "77"), "hook:crm")
HOME = verified(email_identity("carol@home.example"), "hook:portal")


def _message(sender: Identity, minutes: int, *others: Identity) -> InboundMessage:
    return InboundMessage(
        id=uuid7(),
        channel="sms" if sender.kind == "phone" else "email",
        adapter="test",
        received_at=NOW + timedelta(minutes=minutes),
        sender=sender,
        identities=others,
        text=f"message {minutes}",
        dedupe_key=f"test:{uuid.uuid4()}",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Engine]]:
    """Makes fresh migrated databases of one kind: the router's and the queue's
    tables in one, as `switchboard run` has them."""
    made: list[tuple[Engine, str | None]] = []
    # Only the PostgreSQL runs ask for a server (it may have to be started).
    postgres_url = "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    admin = make_engine(postgres_url or "sqlite://")

    def fresh() -> Engine:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'db{len(made)}.sqlite'}"
            engine = make_engine(url, sqlite_immediate=True)
            made.append((engine, None))
        else:
            schema = f"m_{uuid.uuid4().hex[:10]}"
            with admin.begin() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            engine = make_engine(with_search_path(postgres_url, schema))
            made.append((engine, schema))
        upgrade(engine)
        return engine

    try:
        yield fresh
    finally:
        for engine, schema in made:
            engine.dispose()
            if schema is not None:
                with admin.begin() as c:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def directory(engine: Engine) -> dict[str, dict[str, Any]]:
    """Per contact with identities: its identity keys and {conversation: sorted message
    texts}, as the router's tables have them; every conversation with its contact's
    owner (snapshot checks it)."""
    snapshot(engine)
    with engine.connect() as c:
        keys = c.execute(select(identities.c.key, identities.c.contact_id)).all()
        convs = c.execute(select(conversations.c.id, conversations.c.contact_id)).all()
        found = c.execute(
            select(messages.c.id, messages.c.conversation_id, messages.c.contact_id)
        ).all()
        counts = {
            row.id: row.message_count
            for row in c.execute(select(conversations.c.id, conversations.c.message_count))
        }
    out: dict[str, dict[str, Any]] = {}
    for key, contact in keys:
        out.setdefault(str(contact), {"identities": set(), "conversations": {}})
        out[str(contact)]["identities"].add(key)
    for conv, contact in convs:
        mine = sorted(str(m) for m, cv, ct in found if cv == conv and ct == contact)
        assert counts[conv] == len(mine), "message_count follows the messages"
        out[str(contact)]["conversations"][str(conv)] = mine
    return out


@pytest.mark.slow
def test_confirm_then_unmerge_restores_both_contacts(
    databases: Callable[[], Engine], tmp_path: Path
) -> None:
    engine = databases()
    with fresh_kafka() as kafka:
        queue = QueueStore(engine, {"support": ("alice", "bob", "carol")})
        sink = QueueSink(kafka, queue, group_id="merge-test")
        router_store = store_for(engine)
        publisher = Publisher(kafka)
        app = create_app(Readiness())
        app.include_router(
            queue_router(queue, FileBlobStore(tmp_path), publisher, TOKEN, router_store)
        )
        install_denied_handler(app)
        try:
            with (
                running_router(kafka, router_store),
                running_sink(sink),
                _serving(app) as base,
            ):
                api = httpx.Client(
                    base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=15
                )

                def contact(identity: str) -> dict[str, Any] | None:
                    answer = api.get("/api/contacts", params={"identity": identity})
                    return answer.json() if answer.status_code == 200 else None

                def routed(n: int) -> None:
                    _until(lambda: sink.applied >= n and len(queue.rows()["queue_messages"]) >= n)

                email_1, sms_1, email_2 = (
                    _message(EMAIL, 0),
                    _message(PHONE, 1),
                    _message(EMAIL, 2),
                )
                publish(kafka, [email_1, sms_1, email_2])
                _until(lambda: len(queue.rows()["queue_messages"]) == 3)
                by_email, by_phone = contact(EMAIL.key), contact(PHONE.key)
                assert by_email is not None
                assert by_phone is not None
                a, b = by_email["id"], by_phone["id"]
                assert a != b
                before = directory(engine)
                assert before[a]["identities"] == {EMAIL.key}
                assert before[b]["identities"] == {PHONE.key}

                # Wrong requests say why.
                assert (
                    api.post(f"/api/contacts/{a}/merge", json={"contact_id": a}).status_code == 409
                )
                unknown = api.post(
                    f"/api/contacts/{a}/merge", json={"contact_id": str(uuid.uuid4())}
                )
                assert unknown.status_code == 404
                nul = api.post(f"/api/contacts/{a}/merge", json={"contact_id": b, "by": "a\x00b"})
                assert nul.status_code == 422
                assert (
                    api.post(f"/api/contacts/{a}/unmerge", json={"contact_id": b}).status_code
                    == 409
                )

                merged = api.post(f"/api/contacts/{a}/merge", json={"contact_id": b, "by": "alice"})
                assert merged.status_code == 200, merged.text
                one = merged.json()["contact"]
                assert one["id"] == a
                assert set(one["identities"]) == {EMAIL.key, PHONE.key}
                assert len(one["conversations"]) == 2
                assert (contact(PHONE.key) or {})["id"] == a

                # Carol writes on both channels while the contacts are one; her SMS
                # brings a verified CRM id, which links to the merged contact.
                email_3, sms_2 = _message(EMAIL, 3), _message(PHONE, 4, CRM)
                publish(kafka, [email_3])
                _until(lambda: len(queue.rows()["queue_messages"]) == 4)
                publish(kafka, [sms_2])
                _until(lambda: len(queue.rows()["queue_messages"]) == 5)
                # Her portal signs in with a new address and sends her phone along:
                # through the phone, the new address links to the merged contact too.
                # A message carrying both her email and her phone says nothing new.
                portal, both = _message(HOME, 5, PHONE), _message(EMAIL, 6, PHONE)
                publish(kafka, [portal])
                _until(lambda: len(queue.rows()["queue_messages"]) == 6)
                publish(kafka, [both])
                _until(lambda: len(queue.rows()["queue_messages"]) == 7)
                during = directory(engine)
                assert set(during) == {a}
                assert during[a]["identities"] == {EMAIL.key, PHONE.key, CRM.key, HOME.key}
                # The SMS joined the latest conversation, the email one's.
                (email_conversation,) = before[a]["conversations"]
                assert str(sms_2.id) in during[a]["conversations"][email_conversation]

                undone = api.post(f"/api/contacts/{a}/unmerge", json={"contact_id": b, "by": "bob"})
                assert undone.status_code == 200, undone.text
                assert undone.json()["contact"]["id"] == b
                again = api.post(f"/api/contacts/{a}/unmerge", json={"contact_id": b})
                assert again.status_code == 409

                after = directory(engine)
                (sms_conversation,) = before[b]["conversations"]
                assert after == {
                    a: {
                        "identities": {EMAIL.key},
                        "conversations": {
                            email_conversation: sorted(
                                [
                                    *before[a]["conversations"][email_conversation],
                                    str(email_3.id),
                                    str(both.id),
                                ]
                            )
                        },
                    },
                    b: {
                        "identities": {PHONE.key, CRM.key, HOME.key},
                        "conversations": {
                            sms_conversation: sorted(
                                [
                                    *before[b]["conversations"][sms_conversation],
                                    str(sms_2.id),
                                    str(portal.id),
                                ]
                            )
                        },
                    },
                }
                # The API shows the same, message by message.
                shown_b = contact(PHONE.key) or {}
                assert shown_b["id"] == b
                assert not shown_b["merged"]
                assert set(shown_b["identities"]) == {PHONE.key, CRM.key, HOME.key}
                assert (contact(CRM.key) or {})["id"] == b
                assert (contact(EMAIL.key) or {})["id"] == a
                conv_b = api.get(f"/api/conversations/{sms_conversation}").json()
                assert [m["id"] for m in conv_b["messages"]] == [
                    str(sms_1.id),
                    str(sms_2.id),
                    str(portal.id),
                ]
                assert conv_b["message_count"] == 3
                assert conv_b["last_preview"] == "message 5"
                assert conv_b["contact_id"] == b
                conv_a = api.get(f"/api/conversations/{email_conversation}").json()
                assert [m["id"] for m in conv_a["messages"]] == [
                    str(email_1.id),
                    str(email_2.id),
                    str(email_3.id),
                    str(both.id),
                ]
                assert conv_a["message_count"] == 4
                assert conv_a["last_preview"] == "message 6"

                # Carol's next SMS goes to her SMS contact again.
                sms_3 = _message(PHONE, 7)
                publish(kafka, [sms_3])
                _until(lambda: len(queue.rows()["queue_messages"]) == 8)
                assert str(sms_3.id) in directory(engine)[b]["conversations"][sms_conversation]
                # 8 routed, 2 created, 2 linked (the API applied the merge and unmerge).
                _until(lambda: sink.applied >= 12)
                live = queue.rows()
        finally:
            publisher.close()

        with engine.connect() as c:
            (record,) = c.execute(select(merges).where(merges.c.merged_id == uuid.UUID(b))).all()
        assert (record.by, record.undone_by) == ("alice", "bob")

        # A read model rebuilt from the topics is the one the agent saw.
        rebuilt = QueueStore(databases(), {"support": ("alice", "bob", "carol")})
        replay = QueueSink(kafka, rebuilt, group_id="merge-rebuild", rebuild=True)
        with running_sink(replay):
            _until(lambda: replay.applied >= sink.applied)
        replayed = rebuilt.rows()
        for table, rows in live.items():
            differ = sorted(set(replayed[table]) ^ set(rows))
            assert differ == [], f"{table}: live {rows}\nrebuilt {replayed[table]}"


@pytest.mark.slow
def test_cli_merges_and_unmerges(tmp_path: Path) -> None:
    """`switchboard contacts merge|unmerge` act on the directory; without a broker
    the event stays recorded for the router's relay."""
    url = f"sqlite:///{tmp_path / 'switchboard.db'}"
    engine = make_engine(url, sqlite_immediate=True)
    upgrade(engine)
    store = store_for(engine)
    outcomes = store.route_batch([_message(EMAIL, 0), _message(PHONE, 1)])
    a, b = (str(o.events[-1].key) for o in outcomes)
    config = tmp_path / "switchboard.toml"
    config.write_text('[[teams]]\nname = "support"\nagents = ["alice", "bob", "carol"]\n')
    env = {
        **os.environ,
        "SWITCHBOARD_CONFIG": str(config),
        "SWITCHBOARD_DATABASE_URL": url,
        "SWITCHBOARD_KAFKA_BOOTSTRAP": "",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "switchboard.cli", "contacts", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = cli("merge", a, b, "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert f"contact {b} merged into {a}" in done.stdout
    assert survivor_of(store.engine, uuid.UUID(b)) == uuid.UUID(a)
    refused = cli("merge", a, b)
    assert refused.returncode == 1
    assert "already one contact" in refused.stderr
    undone = cli("unmerge", a, b, "--by", "bob")
    assert undone.returncode == 0, undone.stderr
    assert survivor_of(store.engine, uuid.UUID(b)) == uuid.UUID(b)
    assert [e.type for e in store.pending()] == [
        "io.switchboard.contact.merged.v1",
        "io.switchboard.contact.unmerged.v1",
    ]
    assert cli("unmerge", a, "not-a-uuid").returncode == 2
    engine.dispose()
