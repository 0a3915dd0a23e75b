"""The router on the real broker and PostgreSQL, fed by the real adapters."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select
from twilio.request_validator import RequestValidator

from normalize.schema import ContactEvent, DeadLetter, MessageDuplicate, MessageRouted
from router.tables import inboxes, outbox
from switchboard.events import TYPE_DUPLICATE, TYPE_ROUTED, contact_event_type
from switchboard.kafka import Publisher
from switchboard.settings import KafkaSettings, TwilioSettings, WebhookSettings
from switchboard.topics import CONTACTS, DEADLETTER, INBOUND, ROUTED
from tests import local_http
from tests.dovecot import Dovecot
from tests.factories import inbound_message
from tests.http_helpers import find, http_ingest
from tests.imap_helpers import imap_adapter, mailbox, wait_for
from tests.router_helpers import (
    CONFIG,
    events_of,
    fresh_kafka,
    inbound_event,
    processed,
    publish,
    running_router,
    snapshot,
    store_for,
)
from tests.smtp_helpers import smtp_server

pytestmark = pytest.mark.integration

TOKEN = "twilio-test-token-0123456789abcdef"
SWITCHBOARD = [sys.executable, "-m", "switchboard.cli"]
CREATED = contact_event_type("contact.created")


@pytest.fixture
def kafka() -> Iterator[KafkaSettings]:
    with fresh_kafka() as settings:
        yield settings


def routed_count(engine: Engine) -> int:
    with engine.connect() as c:
        return len(set(c.execute(select(outbox.c.message_id)).scalars()))


def email(sender: str, mid: str, subject: str = "Help") -> bytes:
    return (
        f"From: {sender}\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nHello\r\n"
    ).encode()


def twilio_post(base: str, sid: str, sender: str) -> httpx.Response:
    url = f"{base}/webhooks/twilio/sms"
    form = {
        "MessageSid": sid,
        "AccountSid": "AC" + "1" * 32,
        "From": sender,
        "To": "+14155550199",
        "Body": "Any news on my refund?",
        "NumMedia": "0",
    }
    signature = RequestValidator(TOKEN).compute_signature(url, form)
    return local_http.post(url, data=form, headers={"x-twilio-signature": signature}, timeout=15)


@pytest.mark.slow
def test_every_channel_one_contact_one_owner_one_conversation(
    kafka: KafkaSettings,
    migrated_postgres: Engine,
    dovecot: Dovecot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ann's one email reaches the SMTP server and the IMAP mailbox.
    ann = email("Ann <ann@example.org>", "ann-1@example.org")
    with smtp_server(kafka, tmp_path) as smtp:
        assert smtp.send(ann, mail_from="ann@example.org")[0] == 250
    dovecot.deliver(ann)
    box = mailbox(dovecot, "sales", monkeypatch.setenv, address="sales@example.com")
    with imap_adapter(kafka, tmp_path, [box]) as state:
        wait_for(lambda: state.checkpoint("sales", "INBOX") is not None, 20)
    # Bob fills in the form of the company's signed backend, which vouches for his
    # email and phone (he is logged in), texts from that phone (Twilio retries the
    # webhook once), then emails from that address.
    monkeypatch.setenv("FORM_SECRET", "form-secret")
    hook = WebhookSettings.model_validate(
        {
            "name": "contact-form",
            "auth": {"kind": "hmac-sha256", "secret_env": "FORM_SECRET", "allow_replay": True},
            "map": {"email": "email", "phone": "phone", "text": "text", "id": "id"},
            "content_types": ["json"],
            "default_region": "US",
            "verified": ["email", "phone"],
        }
    )
    twilio = TwilioSettings(auth_token=[SecretStr(TOKEN)])
    with http_ingest(kafka, tmp_path, twilio=twilio, hooks=[hook]) as http:
        body = json.dumps(
            {"id": "f-1", "email": "Bob@Example.org", "phone": "(415) 555-0123", "text": "Hi"}
        ).encode()
        signature = hmac.new(b"form-secret", body, hashlib.sha256).hexdigest()
        answer = local_http.post(
            f"{http.base}/webhooks/contact-form",
            content=body,
            headers={"content-type": "application/json", "x-signature": signature},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        for _ in range(2):
            assert twilio_post(http.base, "SM" + "b" * 32, "+14155550123").status_code == 200
    with smtp_server(kafka, tmp_path) as smtp:
        bob_mail = email("bob@example.org", "bob-1@example.org")
        assert smtp.send(bob_mail, mail_from="bob@example.org")[0] == 250

    store = store_for(migrated_postgres)
    with running_router(kafka, store):
        wait_for(lambda: routed_count(migrated_postgres) == 6, 60)

    snap = snapshot(migrated_postgres)
    assert len(snap.contacts) == 2, snap.contacts
    ann_id = snap.contact_of("email:ann@example.org")
    bob_id = snap.contact_of("phone:+14155550123")
    assert bob_id is not None
    assert snap.contacts[bob_id][1] == {"email:bob@example.org", "phone:+14155550123"}
    assert {owner for owner, _ in snap.contacts.values()} <= set(CONFIG.teams["support"].agents)
    ann_messages = [m for m, (c, _, _) in snap.messages.items() if c == ann_id]
    bob_messages = [m for m, (c, _, _) in snap.messages.items() if c == bob_id]
    assert len(ann_messages) == 1
    assert len(bob_messages) == 3  # form, SMS (once), email
    assert len({snap.messages[m][1] for m in bob_messages}) == 1  # one conversation
    with migrated_postgres.connect() as c:
        ann_inboxes = set(
            c.execute(
                select(inboxes.c.inbox).where(inboxes.c.message_id == ann_messages[0])
            ).scalars()
        )
    # Both inboxes: the SMTP envelope's and the mailbox the IMAP copy was read from.
    assert ann_inboxes == {"email:support@example.com", "email:sales@example.com"}

    routed = events_of(kafka, ROUTED, TYPE_ROUTED, MessageRouted, count=4)
    assert {r.contact_id for r in routed} == {ann_id, bob_id}
    assert len({(r.contact_id, r.owner) for r in routed}) == 2  # one owner per contact
    duplicates = events_of(kafka, ROUTED, TYPE_DUPLICATE, MessageDuplicate, count=2)
    # The SMTP and the IMAP copy share their whole key (Message-ID and content digest).
    assert {d.dedupe_key.split("#")[0] for d in duplicates} == {
        "email-mid:ann-1@example.org",
        "twilio:SM" + "b" * 32,
    }


@pytest.mark.slow
def test_redelivery_after_a_lost_commit_reemits_the_same_events(
    kafka: KafkaSettings, migrated_postgres: Engine
) -> None:
    messages = [
        inbound_message(sender=inbound_message().sender, dedupe_key=f"email-mid:{i}@example.org")
        for i in range(3)
    ]
    publish(kafka, messages)
    store = store_for(migrated_postgres)
    with running_router(kafka, store, group="first"):
        wait_for(lambda: processed(migrated_postgres) >= {m.id for m in messages}, 30)
    # A second group re-reads the whole topic, as a router that crashed before
    # committing would: nothing new in the directory, the same event ids again.
    before = snapshot(migrated_postgres)
    with running_router(kafka, store, group="second") as router:
        wait_for(lambda: router.stats.results["replayed"] == 3, 30)
    assert snapshot(migrated_postgres) == before
    routed = events_of(kafka, ROUTED, TYPE_ROUTED, MessageRouted, count=6)
    assert len(routed) == 6
    assert len({r.event_id for r in routed}) == 3
    created = events_of(kafka, CONTACTS, CREATED, ContactEvent, count=2)
    assert len({c.event_id for c in created}) == 1


@pytest.mark.slow
def test_a_record_that_is_not_an_inbound_event_is_dead_lettered(
    kafka: KafkaSettings, migrated_postgres: Engine
) -> None:
    publisher = Publisher(kafka)
    try:
        garbage = inbound_event(inbound_message())
        raw = publisher._current()  # the raw producer: send what no adapter would
        raw.send(INBOUND, key=b"x", value=b"{not json", headers=garbage.headers()).get(10)
        raw.send(INBOUND, key=b"y", value=b"{}", headers=[]).get(10)
    finally:
        publisher.close()
    good = inbound_message()
    publish(kafka, [good])
    store = store_for(migrated_postgres)
    with running_router(kafka, store) as router:
        wait_for(lambda: good.id in processed(migrated_postgres), 30)
        wait_for(lambda: router.stats.results["bad-record"] == 2, 10)
    letters = find(kafka, "check", DEADLETTER, DeadLetter, lambda _: True, count=2)
    assert sorted(letter.reason for letter in letters) == ["envelope-headers", "envelope-schema"]


@pytest.mark.slow
def test_contacts_assign_command_reassigns_and_publishes(
    kafka: KafkaSettings, migrated_postgres: Engine, postgres_schema_url: str, tmp_path: Path
) -> None:
    first = inbound_message()
    publish(kafka, [first])
    store = store_for(migrated_postgres)
    with running_router(kafka, store):
        wait_for(lambda: first.id in processed(migrated_postgres), 30)
    contact_id = next(iter(snapshot(migrated_postgres).contacts))
    env = {
        **os.environ,
        "SWITCHBOARD_DATABASE_URL": postgres_schema_url,
        "SWITCHBOARD_KAFKA_BOOTSTRAP": kafka.bootstrap or "",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
    }
    config = tmp_path / "switchboard.toml"
    config.write_text('[[teams]]\nname = "support"\nagents = ["alice", "bob", "carol"]\n')
    env["SWITCHBOARD_CONFIG"] = str(config)

    def assign(owner: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SWITCHBOARD, "contacts", "assign", str(contact_id), owner],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = assign("carol")
    assert done.returncode == 0, done.stderr
    assert "owner.assigned published" in done.stdout
    bad = assign("mallory")
    assert bad.returncode == 2
    assert "'mallory' is not an agent or team" in bad.stderr
    (event,) = find(
        kafka, "check", CONTACTS, ContactEvent, lambda e: e.kind == "owner.assigned", count=1
    )
    assert (event.contact_id, event.owner, event.reason) == (contact_id, "carol", "manual")
    # Sticky from now on: the next message goes to carol.
    later = inbound_message(sender=first.sender, dedupe_key="email-mid:later@example.org")
    publish(kafka, [later])
    started = time.monotonic()
    with running_router(kafka, store):
        wait_for(lambda: later.id in processed(migrated_postgres), 30)
    assert time.monotonic() - started < 60
    assert snapshot(migrated_postgres).contacts[contact_id][0] == "carol"
