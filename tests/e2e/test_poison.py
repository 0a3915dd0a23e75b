"""One poison message stops nothing: the whole pipeline, as a user runs it.

The attack (issue 16): an SMTP mail with ``Message-ID: <a\\x00b@x>`` got 250 and
then stalled routing on PostgreSQL for good; a public form post with a NUL in its
text stalled the queue sink; a read-model record whose ``ce_id`` is not a UUID
did the same. Here, on SQLite and on PostgreSQL, with a broker that outlives the
process (so a restart finds the same records again):

- the NUL email and the NUL form post arrive (the normalizers strip the NUL);
- poison records written straight to the topics, as a foreign or older producer
  could (a NUL Message-ID in an inbound event, a NUL text and a non-UUID ``ce_id``
  in routed events), go to the dead letter topic with their reasons;
- 20 ordinary messages from 20 people sent after them are all visible in the
  queue API, and after a restart on the same data nothing stalls.
"""

from __future__ import annotations

import json
import smtplib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from kafka import KafkaConsumer

from normalize.identity import email_identity
from normalize.schema import InboundMessage
from switchboard.broker import EmbeddedBroker
from switchboard.events import TYPE_INBOUND, TYPE_ROUTED, Event
from switchboard.kafka import Publisher
from switchboard.settings import KafkaSettings
from switchboard.topics import DEADLETTER, INBOUND, ROUTED, ensure_topics
from tests import local_http
from tests.e2e.test_run import _env, _stop, _wait_healthy, running
from tests.kafka_helpers import consume_until

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "poison-e2e-token"
CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "contact"
auth = { kind = "none" }
map = { email = "email", text = "message", id = "id" }

[[teams]]
name = "support"
agents = ["alice", "bob"]
"""
T = TypeVar("T")


def _until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what}")


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    # A broker of the test's own, outside the process: it keeps the poison records
    # across the restart, as a real Kafka does.
    with EmbeddedBroker() as running_broker:
        ensure_topics(KafkaSettings(bootstrap=running_broker.bootstrap))
        yield running_broker


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'poison.db'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


def _poison(kafka: KafkaSettings) -> dict[str, str]:
    """Poison records straight onto the topics; returns the reason expected per ce_id."""
    message = InboundMessage(
        id=uuid.uuid4(),
        channel="email",
        adapter="smtp",
        received_at=datetime.now(UTC),
        sender=email_identity("old-producer@example.org"),
        subject="x",
        dedupe_key="email-mid:placeholder@x",
    )
    # What an older producer (before the schema refused controls) could have written.
    nul_inbound = message.model_dump_json().replace("placeholder@x", "a\\u0000b@x").encode()
    routed_nul = json.dumps({"event_id": str(uuid.uuid4()), "text": "hi\u0000there"}).encode()
    events = [
        (INBOUND, Event(TYPE_INBOUND, "test/old", "email:old-producer@example.org", nul_inbound)),
        (ROUTED, Event(TYPE_ROUTED, "test/old", "c1", routed_nul)),
        (ROUTED, Event(TYPE_ROUTED, "test/old", "c2", b"{}", id="not-a-uuid")),
    ]
    publisher = Publisher(kafka)
    try:
        publisher.publish_many(events)
    finally:
        publisher.close()
    return {
        events[0][1].id: "envelope-schema",
        events[1][1].id: "envelope-schema",
        "not-a-uuid": "envelope-id",
    }


def _dead_letters(kafka: KafkaSettings, wanted: set[str]) -> dict[str, dict[str, Any]]:
    consumer = KafkaConsumer(
        DEADLETTER,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kafka.client_config(),
    )
    try:

        def letters(records: list[Any]) -> dict[str, dict[str, Any]]:
            found = {}
            for record in records:
                letter = json.loads(record.value)
                found[letter.get("source_event_id") or ""] = letter
            return found

        records = consume_until(consumer, lambda rs: wanted <= set(letters(rs)), timeout_s=40)
        return letters(records)
    finally:
        consumer.close()


def test_poison_records_are_dead_lettered_and_everyone_after_them_is_routed(
    tmp_path: Path, broker: EmbeddedBroker, database_url: str
) -> None:
    kafka = KafkaSettings(bootstrap=broker.bootstrap)
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(
        tmp_path,
        SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"),
        SWITCHBOARD_KAFKA_BOOTSTRAP=broker.bootstrap,
        SWITCHBOARD_DATABASE_URL=database_url,
        SWITCHBOARD_API_TOKEN=TOKEN,
        SWITCHBOARD_CONSUMERS_MAX_ATTEMPTS="2",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    smtp_port = int(env["SWITCHBOARD_SMTP_PORT"])
    api = httpx.Client(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)

    def visible(identity: str) -> bool:
        answer = api.get("/api/contacts", params={"identity": identity})
        return answer.status_code == 200 and bool(answer.json()["conversations"])

    def send_mail(sender: str, message_id: str, text: str) -> None:
        mail = (
            f"From: {sender}\r\nTo: support@example.com\r\nSubject: hello\r\n"
            f"Message-ID: {message_id}\r\n\r\n{text}\r\n"
        ).encode()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
            smtp.sendmail(sender, ["support@example.com"], mail)

    def send_form(email: str, text: str) -> None:
        body = json.dumps({"id": uuid.uuid4().hex, "email": email, "message": text})
        answer = local_http.post(
            f"{base}/webhooks/contact",
            content=body.encode(),
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text

    expected = _poison(kafka)
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=40)
        # The two reproductions through the real edges: accepted, stripped, routed.
        send_mail("nul-mail@example.org", "<a\x00b@x>", "a NUL in my Message-ID")
        send_form("nul-form@example.org", "hi\u0000there")
        people = [f"person{i}@example.org" for i in range(20)]
        for i, person in enumerate(people):
            if i % 2:
                send_form(person, f"form message {i}")
            else:
                send_mail(person, f"<ordinary-{i}-{uuid.uuid4().hex}@example.org>", f"mail {i}")
        for identity in ["nul-mail@example.org", "nul-form@example.org", *people]:
            _until(partial(visible, f"email:{identity}"), 60, f"{identity} in the queue")
        form = api.get("/api/contacts", params={"identity": "email:nul-form@example.org"}).json()
        conversation = api.get(f"/api/conversations/{form['conversations'][0]['id']}").json()
        assert conversation["messages"][0]["text"] == "hithere"

        letters = _dead_letters(kafka, set(expected))
        for ce_id, reason in expected.items():
            assert letters[ce_id]["reason"] == reason, letters[ce_id]
        assert letters["not-a-uuid"]["stage"] == "sink"
        assert letters["not-a-uuid"]["metadata"]["topic"] == ROUTED
        ready = local_http.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        code, _, stderr = _stop(process)
        assert code == 0, stderr

    # Restarted on the same data and the same broker: nothing stalls.
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=40)
        send_mail("after-restart@example.org", "<after-restart@example.org>", "still there?")
        _until(lambda: visible("email:after-restart@example.org"), 60, "the mail after restart")
        code, _, stderr = _stop(process)
        assert code == 0, stderr
