"""What the agent sees of a sender's trust (issue 17), in the API and in Chromium.

The attacks: a forged ``From: Carol`` sat in Carol's conversation indistinguishable
from her mail; a display name ``Carol <carol@customer.example>`` was shown beside
the real address; a right-to-left override in a file name (``invoice<U+202E>fdp.exe``
displays as ``invoiceexe.pdf``) was shown as is; a bounce quoting Carol's mail read
as the customer's words. The read model on SQLite and PostgreSQL; the page through
the real HTTP server and Debian's Chromium.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import Engine, insert, text

from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import (
    Attachment,
    AuthCheck,
    Authentication,
    BlobRef,
    Flags,
    Identity,
    MessageRouted,
    Thread,
)
from sinks.agents import AgentStore
from sinks.api import install_denied_handler, queue_router
from sinks.auth import Access
from sinks.migrations import CHAIN as QUEUE
from sinks.queue import QueueStore, q_messages
from switchboard.blobs import FileBlobStore
from switchboard.databases import upgrade
from switchboard.db import _alembic_config, make_engine
from switchboard.events import TYPE_ROUTED
from switchboard.http import Readiness, create_app
from switchboard.ids import uuid7
from switchboard.runtime import HttpServer
from tests import local_http
from tests.e2e.test_queue import _chromium
from tests.factories import inbound_message

pytestmark = pytest.mark.integration

TOKEN = "agent-view-token"
T0 = datetime.now(UTC) - timedelta(hours=1)
CONTACT, CONVERSATION = uuid.uuid4(), uuid.uuid4()
SHA = "ab" * 32


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_schema_url")
    else:
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    engine: Engine = make_engine(url)
    upgrade(engine)
    yield QueueStore(engine, {"support": ("alice", "bob")})
    engine.dispose()


def _route(store: QueueStore, sender: Identity, minutes: int, **fields: object) -> None:
    message = inbound_message(
        id=uuid7(),
        sender=sender,
        identities=(),
        received_at=T0 + timedelta(minutes=minutes),
        dedupe_key=f"test:{uuid.uuid4()}",
        thread=Thread(),
        **fields,
    )
    event = MessageRouted(
        event_id=uuid.uuid4(),
        message=message,
        contact_id=CONTACT,
        conversation_id=CONVERSATION,
        owner="alice",
        reason="sticky",
        new_contact=minutes == 0,
        new_conversation=minutes == 0,
        routed_at=message.received_at,
    )
    assert store.apply(TYPE_ROUTED, str(event.event_id), event.model_dump_json().encode())


def _fill(store: QueueStore) -> None:
    pdf = Attachment(
        filename="invoice\u202efdp.exe",
        content_type="application/octet-stream",
        size=10,
        sha256=SHA,
        blob=BlobRef(sha256=SHA, size=10, content_type="application/octet-stream"),
    )
    # A forged From, with a display name that looks like an address.
    _route(
        store,
        email_identity("carol@customer.example", "Carol <carol@customer.example>"),
        0,
        subject="Refund",
        text="Send the refund to IBAN XX00.",
        text_new=None,
        html=None,
        attachments=(pdf,),
    )
    # Carol, verified by DMARC.
    _route(
        store,
        verified(email_identity("carol@customer.example", "Carol"), "dmarc=pass"),
        1,
        subject="Hello",
        text="It is really me.",
        text_new=None,
        html=None,
        attachments=(),
        authentication=Authentication(
            source="local",
            checks=(AuthCheck(method="dmarc", result="pass", domain="customer.example"),),
        ),
    )
    # A bounce quoting Carol's mail.
    _route(
        store,
        email_identity("mailer-daemon@mx.customer.example"),
        2,
        subject="Undelivered Mail Returned to Sender",
        text="Send the refund to IBAN YY99 instead.",
        text_new=None,
        html=None,
        attachments=(),
        flags=Flags(bounce=True, bounced_message_id="x@y"),
    )
    # An SMS signed by Twilio.
    _route(
        store,
        verified(phone_identity("+14155550100"), "twilio-signature"),
        3,
        channel="sms",
        subject=None,
        text="On my way",
        text_new=None,
        html=None,
        attachments=(),
    )


def test_every_message_says_whether_its_sender_was_verified(store: QueueStore) -> None:
    _fill(store)
    messages = store.conversation(CONVERSATION)["messages"]
    assert [m["sender_verified"] for m in messages] == [False, True, False, True]
    assert messages[0]["authentication"] is None
    assert messages[1]["sender_evidence"] == "dmarc=pass"
    assert messages[1]["authentication"] == {
        "source": "local",
        "checks": [
            {"method": "dmarc", "result": "pass", "domain": "customer.example", "detail": None}
        ],
    }
    assert messages[3]["sender_evidence"] == "twilio-signature"


@contextmanager
def _serving(store: QueueStore, blobs: Path) -> Iterator[str]:
    """The queue's API and page on a real uvicorn server; yields its base URL."""
    app = create_app(Readiness())
    access = Access(TOKEN, AgentStore(store.engine, ["alice", "bob"]))
    app.include_router(queue_router(store, FileBlobStore(blobs), None, access))
    install_denied_handler(app)
    server = HttpServer(app, "127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_the_api_answers_sender_verified_and_authentication_over_http(
    store: QueueStore, tmp_path: Path
) -> None:
    _fill(store)
    with _serving(store, tmp_path / "blobs") as base:
        answer = local_http.get(
            f"{base}/api/conversations/{CONVERSATION}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
    assert answer.status_code == 200, answer.text
    messages = answer.json()["messages"]
    assert [m["sender_verified"] for m in messages] == [False, True, False, True]
    assert [m["authentication"] is None for m in messages] == [True, False, True, True]
    assert messages[1]["authentication"]["checks"][0] == {
        "method": "dmarc",
        "result": "pass",
        "domain": "customer.example",
        "detail": None,
    }
    assert messages[2]["flags"]["bounce"] is True
    # The API gives the raw name; only the page decides how to show it.
    assert messages[0]["sender_name"] == "Carol <carol@customer.example>"
    assert messages[0]["attachments"][0]["filename"] == "invoice\u202efdp.exe"


def test_messages_stored_before_revision_2_read_as_unverified(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with engine.begin() as connection:
            config = _alembic_config(connection, QUEUE)
            command.upgrade(config, "queue_0002")  # the single chain's 0004
            connection.execute(
                text(
                    "INSERT INTO queue_messages (id, conversation_id, contact_id, channel,"
                    " sender, received_at, attachments, auto_reply, bounce,"
                    " inboxes) VALUES (:id, :conv, :contact, 'email',"
                    " 'email:carol@customer.example', :at, '[]', 0, 0, '[]')"
                ),
                {
                    "id": uuid.uuid4().hex,
                    "conv": CONVERSATION.hex,
                    "contact": CONTACT.hex,
                    "at": T0.isoformat(),
                },
            )
        upgrade(engine)
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT sender_verified, authentication FROM queue_messages")
            ).one()
        assert (bool(row.sender_verified), row.authentication) == (False, None)
    finally:
        engine.dispose()


def test_the_page_warns_neutralizes_and_marks_bounces_in_chromium(
    tmp_path: Path, postgres_schema_url: str
) -> None:
    engine = make_engine(postgres_schema_url)
    upgrade(engine)
    store = QueueStore(engine, {"support": ("alice", "bob")})
    _fill(store)
    with _serving(store, tmp_path / "blobs") as base:
        browser = _chromium()
        try:
            browser.get(f"{base}/queue")
            # The admin signs in with the API token as its password.
            browser.find_element(By.NAME, "name").send_keys("admin")
            browser.find_element(By.NAME, "password").send_keys(TOKEN)
            browser.find_element(By.ID, "sign-in").click()
            wait = WebDriverWait(browser, 20)
            # Signed in once the queue page (with its owner picker) is shown.
            wait.until(expected_conditions.presence_of_element_located((By.ID, "owner")))
            # An old conversation link leads to its section of the customer card.
            browser.get(f"{base}/queue/conversations/{CONVERSATION}")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message")) == 4)
            messages = browser.find_elements(By.CSS_SELECTOR, ".message")
            forged, real, bounce, sms = (m.text for m in messages)
            assert (
                "This message may not have been sent by carol@customer.example: "
                "the sender could not be verified." in forged
            )
            # The address is shown; a display name that looks like an address is not.
            assert "carol@customer.example" in forged
            assert "Carol <carol@customer.example>" not in forged
            assert "invoice[U+202E]fdp.exe" in forged
            assert "may not have been sent" not in real
            assert "verified sender" in real
            assert "Delivery failure notice" in bounce
            assert "IBAN YY99" not in bounce  # behind a "The notice's text" fold, not as words
            assert "may not have been sent" not in sms
            assert "verified sender" in sms
            shot = tmp_path / "agent-view.png"
            browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 1000
        finally:
            browser.quit()
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_attachments_of_messages_stored_before_0007_are_found_after_the_upgrade(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Migration 0007 copies every stored attachment into queue_attachments, so the
    download and blob retention still find them."""
    url = (
        f"sqlite:///{tmp_path / 'old.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_schema_url")
    )
    engine = make_engine(url)
    sha256 = "ab" * 32
    attachment = {"filename": "invoice.pdf", "content_type": "application/pdf", "size": 3}
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection, QUEUE), "queue_0004")  # was 0006
            connection.execute(
                insert(q_messages).values(
                    id=uuid.uuid4(),
                    conversation_id=CONVERSATION,
                    contact_id=CONTACT,
                    channel="email",
                    sender="email:carol@customer.example",
                    received_at=T0,
                    attachments=[{**attachment, "blob": {"sha256": sha256, "size": 3}}],
                    auto_reply=False,
                    bounce=False,
                    inboxes=[],
                )
            )
        upgrade(engine)
        store = QueueStore(engine)
        assert (store.attachment(sha256) or {}).get("filename") == "invoice.pdf"
        assert store.referenced_blobs([sha256, "cd" * 32]) == {sha256}
    finally:
        engine.dispose()
