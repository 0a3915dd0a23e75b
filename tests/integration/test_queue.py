"""The queue sink and its API on the real broker, router and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from normalize.content import Blob
from normalize.identity import email_identity, phone_identity, verified
from normalize.schema import (
    Attachment,
    AuthCheck,
    Authentication,
    ConversationStatus,
    Flags,
    IdentityKind,
    InboundMessage,
    Recipient,
    RecipientRole,
    Thread,
)
from sinks.api import install_denied_handler, queue_router
from sinks.queue import QueueSink, QueueStore
from switchboard.blobs import FileBlobStore
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import TYPE_CONVERSATION_STATUS
from switchboard.http import Readiness, create_app
from switchboard.ids import uuid7
from switchboard.kafka import Publisher
from switchboard.runtime import HttpServer
from switchboard.settings import KafkaSettings
from switchboard.topics import ROUTED
from tests import local_http
from tests.postgres import with_search_path
from tests.router_helpers import (
    CONFIG,
    events_of,
    fresh_kafka,
    publish,
    running_router,
    store_for,
    wait_processed,
)

pytestmark = pytest.mark.integration

TOKEN = "queue-test-token"
TEAMS: dict[str, Sequence[str]] = {"support": CONFIG.teams["support"].agents}
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def _inbox(value: str) -> Recipient:
    kind = IdentityKind.PHONE if value.startswith("+") else IdentityKind.EMAIL
    return Recipient(kind=kind, value=value, role=RecipientRole.TO)


def _message(sender: str, minutes: int, **fields: Any) -> InboundMessage:  # noqa: ANN401
    identity = phone_identity(sender) if sender.startswith("+") else email_identity(sender)
    identity = fields.pop("identity", identity)
    values: dict[str, Any] = {
        "id": uuid7(),
        "channel": "sms" if sender.startswith("+") else "email",
        "adapter": "twilio" if sender.startswith("+") else "smtp",
        "received_at": NOW + timedelta(minutes=minutes),
        "sender": identity,
        "recipients": (
            _inbox("+14155550199" if sender.startswith("+") else "support@example.com"),
        ),
        "text": f"message {minutes} from {sender}",
        "dedupe_key": f"test:{uuid.uuid4()}",
    }
    values.update(fields)
    return InboundMessage(**values)


@dataclass
class World:
    base: str
    kafka: KafkaSettings
    engine: Engine
    sink: QueueSink
    store: QueueStore
    ann: list[InboundMessage]
    bob: list[InboundMessage]
    attachment: Blob
    publish: Callable[[list[InboundMessage]], None]

    def get(self, path: str, **params: Any) -> httpx.Response:  # noqa: ANN401
        return local_http.get(
            f"{self.base}{path}",
            params=params,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def post(self, path: str, body: object) -> httpx.Response:
        return local_http.post(
            f"{self.base}{path}",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )


def _until(check: Callable[[], Any], timeout_s: float = 30) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@contextmanager
def _serving(app: Any) -> Iterator[str]:  # noqa: ANN401 - a FastAPI app
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


@contextmanager
def running_sink(sink: QueueSink) -> Iterator[QueueSink]:
    thread = threading.Thread(target=sink.run_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.request_stop()
        thread.join(20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[World]:
    schema = f"q_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_url)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(with_search_path(postgres_url, schema))
    upgrade(engine)
    blobs = FileBlobStore(tmp_path_factory.mktemp("blobs"))
    attachment = Blob.of(b"%PDF-1.4 invoice", "application/pdf")
    blobs.put(attachment)
    pdf = Attachment(
        filename="invoice 12/2026.pdf",
        content_type="application/pdf",
        size=len(attachment.data),
        sha256=attachment.ref.sha256,
        blob=attachment.ref,
    )
    ann = [
        _message(
            "ann@example.org",
            0,
            subject="Invoice",
            html="<p>See <b>attached</b></p>",
            attachments=(pdf,),
            # Checked and failed: the read model keeps the verdict (and a rebuild too).
            authentication=Authentication(
                source="local",
                checks=(AuthCheck(method="dmarc", result="fail", domain="example.org"),),
            ),
            text="New part\n\n> quoted history",
            text_new="New part",
            thread=Thread(message_id="ann-1@example.org"),
        ),
        _message("+14155550100", 5),  # a second contact, until the form links them
        _message(
            "ann@example.org",
            10,
            channel="webhook",
            adapter="contact-form",
            # The company's signed backend vouches for both: they may merge.
            identity=verified(email_identity("ann@example.org"), "hook:contact-form"),
            identities=(verified(phone_identity("+14155550100"), "hook:contact-form"),),
            recipients=(),
        ),
    ]
    bob = [
        _message("bob@example.org", 2, dedupe_key="email-mid:bob-1@example.org"),
        _message(
            "bob@example.org",
            3,
            dedupe_key="email-mid:bob-1@example.org",  # the same email, by IMAP
            recipients=(_inbox("sales@example.com"),),
        ),
        _message("bob@example.org", 4, flags=Flags(auto_reply=True), text="I am away"),
    ]
    with fresh_kafka() as kafka:
        store = QueueStore(engine, TEAMS)
        sink = QueueSink(kafka, store, group_id="queue-test")
        publisher = Publisher(kafka)
        app = create_app(Readiness())
        app.include_router(queue_router(store, blobs, publisher, TOKEN))
        install_denied_handler(app)
        router_engine = make_engine(with_search_path(postgres_url, schema))

        def send(batch: list[InboundMessage]) -> None:
            publish(kafka, batch)

        try:
            with (
                running_router(kafka, store_for(router_engine)),
                running_sink(sink),
                _serving(app) as base,
            ):
                for m in ann[:2] + bob[:2]:
                    send([m])
                    # In order, as people write: each one routed before the next.
                    wait_processed(router_engine, [m.id], timeout_s=30)
                send([ann[2], bob[2]])
                w = World(base, kafka, engine, sink, store, ann, bob, attachment, send)
                _until(
                    lambda: (
                        w.get("/api/contacts", identity="phone:+14155550100").status_code == 200
                        and len(
                            w.get("/api/contacts", identity="phone:+14155550100").json()[
                                "conversations"
                            ]
                        )
                        >= 1
                        and w.get("/api/contacts", identity="email:bob@example.org").json()[
                            "conversations"
                        ][0]["message_count"]
                        == 2
                        if w.get("/api/contacts", identity="email:bob@example.org").status_code
                        == 200
                        else False
                    )
                )
                _until(
                    lambda: _ann(w)["identities"] == ["email:ann@example.org", "phone:+14155550100"]
                )
                yield w
        finally:
            publisher.close()
            router_engine.dispose()
            engine.dispose()
            with admin.begin() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _ann(w: World) -> dict[str, Any]:
    response = w.get("/api/contacts", identity="email:ann@example.org")
    return response.json() if response.status_code == 200 else {"identities": []}


def test_a_merge_puts_both_contacts_conversations_under_the_survivor(world: World) -> None:
    ann = _ann(world)
    by_phone = world.get("/api/contacts", identity="phone:+14155550100").json()
    assert by_phone["id"] == ann["id"]
    total = sum(c["message_count"] for c in ann["conversations"])
    assert total == 3
    assert {c["owner"] for c in ann["conversations"]} == {ann["owner"]}
    # The contact created for the phone before the merge answers with the survivor.
    merged_ids = {
        c["contact_id"] for c in ann["conversations"]
    }  # conversation rows point at the survivor now
    assert merged_ids == {ann["id"]}


def test_a_merged_contact_id_answers_with_the_survivor(world: World) -> None:
    with world.engine.connect() as c:
        merged = c.execute(
            text("SELECT id, merged_into FROM queue_contacts WHERE merged_into IS NOT NULL")
        ).first()
    assert merged is not None
    answer = world.get(f"/api/contacts/{merged.id}").json()
    assert answer["id"] == str(merged.merged_into)
    assert answer["requested_id"] == str(merged.id)
    assert answer["merged"] is True


def test_conversation_messages_in_time_order_with_everything_an_agent_needs(
    world: World,
) -> None:
    ann = _ann(world)
    first = next(c for c in ann["conversations"] if "email" in c["channels"])
    conversation = world.get(f"/api/conversations/{first['id']}").json()
    times = [m["received_at"] for m in conversation["messages"]]
    assert times == sorted(times)
    email = conversation["messages"][0]
    assert email["subject"] == "Invoice"
    assert email["text_new"] == "New part"
    assert email["html"] == "<p>See <b>attached</b></p>"
    assert email["inboxes"] == ["email:support@example.com"]
    assert email["attachments"][0]["filename"] == "invoice 12/2026.pdf"
    assert email["sender_verified"] is False
    assert email["authentication"]["checks"][0]["result"] == "fail"
    every = [
        m
        for c in ann["conversations"]
        for m in world.get(f"/api/conversations/{c['id']}").json()["messages"]
    ]
    (hook,) = (m for m in every if m["channel"] == "webhook")
    # The form's signed backend vouched for Ann: verified, with the hook as evidence.
    assert (hook["sender_verified"], hook["sender_evidence"]) == (True, "hook:contact-form")
    assert hook["authentication"] is None


def test_a_second_arrival_records_its_inbox_and_no_second_message(world: World) -> None:
    bob = world.get("/api/contacts", identity="email:bob@example.org").json()
    (conversation,) = bob["conversations"]
    assert conversation["message_count"] == 2  # the email once, the auto-reply
    messages = world.get(f"/api/conversations/{conversation['id']}").json()["messages"]
    first = messages[0]
    assert first["inboxes"] == ["email:sales@example.com", "email:support@example.com"]
    assert messages[1]["flags"] == {"auto_reply": True, "bounce": False}
    # The auto-reply did not make the conversation wait longer or look newer to act on.
    assert conversation["oldest_unanswered_at"] == first["received_at"]


def test_queue_lists_oldest_waiting_first_with_a_cursor_and_teams(world: World) -> None:
    owners = {_ann(world)["owner"]}
    owners.add(world.get("/api/contacts", identity="email:bob@example.org").json()["owner"])
    team = world.get("/api/queue", owner="support", limit=200).json()
    # One item per customer with open work, not per conversation.
    everything = [i["contact_id"] for i in team["items"]]
    assert len(everything) >= 2
    assert len(set(everything)) == len(everything)
    waits = [i["waiting_since"] or "9999" for i in team["items"]]
    assert waits == sorted(waits)
    paged: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"owner": "support", "limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = world.get("/api/queue", **params).json()
        paged += [i["contact_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert paged == everything
    for owner in owners:
        mine = world.get("/api/queue", owner=owner).json()["items"]
        assert mine
        assert {i["owner"] for i in mine} == {owner}


def test_attachment_downloads_with_safe_headers(world: World) -> None:
    response = world.get(f"/api/attachments/{world.attachment.ref.sha256}")
    assert response.status_code == 200
    assert response.content == world.attachment.data
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-disposition"] == 'attachment; filename="invoice 12_2026.pdf"'


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/api/queue", {}, 422),
        ("/api/queue", {"owner": "alice", "limit": 0}, 422),
        ("/api/queue", {"owner": "alice", "cursor": "not-a-cursor"}, 422),
        ("/api/conversations/not-a-uuid", {}, 422),
        ("/api/conversations/7f0e4f4e-5d4c-4f8e-9a43-1b2c3d4e5f60", {}, 404),
        ("/api/contacts/0c9a8b7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d", {}, 404),
        ("/api/contacts", {"identity": "email:nobody@example.org"}, 404),
        ("/api/contacts", {"identity": "nobody"}, 422),
        ("/api/attachments/XYZ", {}, 422),
        (f"/api/attachments/{'0' * 64}", {}, 404),
    ],
)
def test_errors_are_problem_json_with_a_clear_detail(
    world: World, path: str, params: dict[str, Any], status: int
) -> None:
    response = world.get(path, **params)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["detail"]
    assert body["detail"] != "see errors"


def test_without_the_token_the_api_refuses(world: World) -> None:
    response = local_http.get(f"{world.base}/api/queue", params={"owner": "alice"}, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    wrong = local_http.get(
        f"{world.base}/api/queue",
        params={"owner": "alice"},
        headers={"authorization": "Bearer nope"},
        timeout=10,
    )
    assert wrong.status_code == 401


def test_status_changes_are_published_and_a_customer_message_reopens(world: World) -> None:
    bob = world.get("/api/contacts", identity="email:bob@example.org").json()
    conversation_id = bob["conversations"][0]["id"]
    bad = world.post(f"/api/conversations/{conversation_id}/status", {"status": "done"})
    assert bad.status_code == 422
    missing = world.post(f"/api/conversations/{uuid.uuid4()}/status", {"status": "closed"})
    assert missing.status_code == 404
    closed = world.post(f"/api/conversations/{conversation_id}/status", {"status": "closed"})
    assert closed.status_code == 200
    assert closed.json()["status"] == "closed"
    assert closed.json()["oldest_unanswered_at"] is None
    owner = bob["owner"]
    # Bob has no open work left: he leaves the owner's queue.
    assert bob["id"] not in [
        i["contact_id"] for i in world.get("/api/queue", owner=owner).json()["items"]
    ]
    published = events_of(
        world.kafka, ROUTED, TYPE_CONVERSATION_STATUS, ConversationStatus, count=1
    )
    assert [(str(e.conversation_id), e.status) for e in published] == [(conversation_id, "closed")]
    # Bob writes again: the conversation is open and waiting again.
    world.publish([_message("bob@example.org", 20, text="still there?")])
    reopened = _until(
        lambda: (
            (c := world.get(f"/api/conversations/{conversation_id}").json())["status"] == "open"
            and c
        )
    )
    assert reopened["message_count"] == 3
    assert reopened["oldest_unanswered_at"] is not None


@pytest.mark.slow
def test_replay_changes_nothing_and_a_rebuild_gives_the_same_rows(
    world: World, postgres_url: str
) -> None:
    live = world.store.rows()
    # Re-delivery of everything to the same read model: every event is skipped.
    replay = QueueSink(world.kafka, world.store, group_id=f"replay-{uuid.uuid4().hex[:6]}")
    with running_sink(replay):
        _until(lambda: replay.skipped + replay.applied >= world.sink.applied, 30)
    assert replay.applied == 0
    assert world.store.rows() == live
    # A rebuild in a database of its own, from the earliest offsets.
    schema = f"r_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_url)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(with_search_path(postgres_url, schema))
    try:
        upgrade(engine)
        rebuilt_store = QueueStore(engine, TEAMS)
        # The live sink's own group, whose offsets are committed at the end: --rebuild
        # must go back to the earliest offsets. (Stop the live sink first, as an
        # operator would; the rebuilt rows go to a database of their own.)
        world.sink.request_stop()
        assert world.sink.closed.wait(30), "the live sink did not leave its group"
        rebuild = QueueSink(world.kafka, rebuilt_store, group_id="queue-test", rebuild=True)
        with running_sink(rebuild):
            _until(lambda: rebuild.applied >= world.sink.applied, 30)
        assert rebuilt_store.rows() == world.store.rows()
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_the_api_refuses_remote_clients_without_a_token(tmp_path: Path, world: World) -> None:

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to connect from")
    app = create_app(Readiness())
    app.include_router(queue_router(world.store, FileBlobStore(tmp_path), None, None))
    install_denied_handler(app)
    server = HttpServer(app, "0.0.0.0", 0)  # noqa: S104 - the point of the test
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        local = local_http.get(f"http://127.0.0.1:{server.port}/api/queue?owner=alice", timeout=10)
        remote = local_http.get(f"http://{address}:{server.port}/api/queue?owner=alice", timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert local.status_code == 200
    assert remote.status_code == 403
    assert "SWITCHBOARD_API_TOKEN" in remote.json()["detail"]
