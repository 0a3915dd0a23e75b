"""The local spool: on disk, under concurrency, across a SIGKILL, and in front of a
real broker that goes away and comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from ingest.spool import Drainer, Spool, SpoolBusy, SpoolFull, read_depth
from normalize.schema import InboundMessage
from switchboard.broker import EmbeddedBroker, free_port
from switchboard.events import Event, read_data, read_meta
from switchboard.kafka import Publisher, make_consumer
from switchboard.settings import KafkaSettings, WebhookSettings
from switchboard.topics import INBOUND, ensure_topics
from tests import local_http
from tests.factories import inbound_message
from tests.http_helpers import http_ingest
from tests.kafka_helpers import consume_until
from tests.router_helpers import inbound_event
from tests.smtp_helpers import queued_id, smtp_server

pytestmark = pytest.mark.integration


def _event(n: int) -> Event:
    return inbound_event(inbound_message(text=f"message {n}"))


def _spool(path: Path, **bounds: int) -> Spool:
    return Spool(
        path,
        max_bytes=bounds.get("max_bytes", 10**8),
        max_messages=bounds.get("max_messages", 10**6),
    )


def test_events_come_back_in_arrival_order_byte_for_byte(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "s.sqlite3")
    events = [_event(n) for n in range(5)]
    for e in events:
        spool.append(INBOUND, e)
    got = spool.peek(10)
    assert [r.event.id for r in got] == [e.id for e in events]
    assert [r.event.value() for r in got] == [e.value() for e in events]
    assert [r.event.headers() for r in got] == [e.headers() for e in events]
    spool.remove(got[:2])
    assert [r.event.id for r in spool.peek(10)] == [e.id for e in events[2:]]
    assert spool.messages == 3
    spool.close()
    reopened = _spool(tmp_path / "s.sqlite3")
    assert reopened.messages == 3
    assert read_depth(tmp_path / "s.sqlite3").messages == 3


def test_the_bound_refuses_and_leaves_the_spool_intact(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "s.sqlite3", max_messages=3)
    for n in range(3):
        spool.append(INBOUND, _event(n))
    with pytest.raises(SpoolFull):
        spool.append(INBOUND, _event(99))
    assert spool.messages == 3
    spool.remove(spool.peek(1))
    spool.append(INBOUND, _event(100))  # room again
    size = _event(0).value()
    small = _spool(tmp_path / "b.sqlite3", max_bytes=len(size) + 200)
    small.append(INBOUND, _event(1))
    with pytest.raises(SpoolFull):
        small.append(INBOUND, _event(2))


def test_concurrent_appends_are_group_committed_without_loss(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "s.sqlite3")
    ids: list[str] = []
    lock = threading.Lock()

    def writer() -> None:
        for n in range(150):
            e = _event(n)
            spool.append(INBOUND, e)
            with lock:
                ids.append(e.id)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [r.event.id for r in spool.peek(10_000)]
    assert sorted(stored) == sorted(ids)
    assert len(stored) == 1200 == spool.messages


_WRITER = """
import sys
from ingest.spool import Spool
from switchboard.events import Event
spool = Spool(__import__("pathlib").Path(sys.argv[1]), max_bytes=10**9, max_messages=10**7)
n = 0
while True:
    event = Event(type="t", source="/s", key="k", data=b"x" * 2000, id=f"id-{n}")
    spool.append("topic", event)
    print(event.id, flush=True)  # acknowledged only after append returned
    n += 1
"""


def _writer(path: Path) -> subprocess.Popen[str]:
    """_WRITER in a process of its own: it prints each id once its append returned."""
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )


def test_nothing_acknowledged_is_lost_when_the_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    for _ in range(3):
        proc = _writer(path)
        assert proc.stdout is not None
        acknowledged: list[str] = []
        while len(acknowledged) < 300:
            acknowledged.append(proc.stdout.readline().strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader = _spool(path)  # the next writer waits for this owner to close it
        stored = {r.event.id for r in reader.peek(10**6)}
        reader.close()
        missing = set(acknowledged) - stored
        assert not missing, f"{len(missing)} acknowledged appends lost"


def test_a_spool_file_has_one_owner_until_it_closes_or_dies(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    owner = _spool(path)
    with pytest.raises(SpoolBusy, match="held by another process"):
        Spool(path, max_bytes=10**8, max_messages=10**6, wait_s=0.3)
    owner.close()
    _spool(path).close()
    # A process that dies (SIGKILL, no close) leaves the file to the next owner at once.
    proc = _writer(path)
    assert proc.stdout is not None
    proc.stdout.readline()
    with pytest.raises(SpoolBusy):
        Spool(path, max_bytes=10**8, max_messages=10**6, wait_s=0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    successor = Spool(path, max_bytes=10**8, max_messages=10**6, wait_s=0)
    assert successor.messages >= 1
    successor.close()


def _email(n: int) -> bytes:
    m = EmailMessage()
    m["From"] = f"spooler{n}@example.org"
    m["To"] = "support@example.com"
    m["Subject"] = f"while the broker is away {n}"
    m["Message-ID"] = f"<spool-{n}-{time.time_ns()}@example.org>"
    m.set_content("Hello")
    return m.as_bytes()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_smtp_accepts_while_kafka_is_down_and_the_spool_drains_in_order(tmp_path: Path) -> None:
    port = free_port()
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{port}", max_block_ms=800, request_timeout_ms=1000)
    broker = EmbeddedBroker(port=port).start()
    ensure_topics(kafka)
    spool = _spool(tmp_path / "spool.sqlite3")
    spooled_before = _sample("switchboard_spooled_total")
    try:
        with smtp_server(kafka, tmp_path, spool=spool) as smtp:
            code, reply = smtp.send(_email(0))
            assert code == 250
            assert spool.messages == 0  # Kafka took it directly
            broker.stop()
            ids = []
            for n in range(1, 6):
                code, reply = smtp.send(_email(n))
                assert code == 250, reply  # durable in the spool, so a real 250
                ids.append(queued_id(reply))
            assert spool.messages == 5
            assert _sample("switchboard_spooled_total") - spooled_before == 5
            broker = EmbeddedBroker(port=port).start()  # memory storage: topics gone too
            ensure_topics(kafka)
            deadline = time.monotonic() + 30
            while spool.messages and time.monotonic() < deadline:
                time.sleep(0.2)
            assert spool.messages == 0, "the spool did not drain after the broker came back"
        consumer = make_consumer(kafka, group_id=f"check-{port}", topics=[INBOUND])
        try:
            records = consume_until(consumer, lambda got: len(got) >= 5)
        finally:
            consumer.close()
        subjects = [str(read_meta(r.headers).subject) for r in records]
        assert sorted(subjects) == sorted(str(i) for i in ids)  # each exactly once
    finally:
        broker.stop()


def test_drained_records_reach_kafka_in_arrival_order(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap=broker.bootstrap, partitions=1)
        ensure_topics(kafka)
        spool = _spool(tmp_path / "s.sqlite3")
        events = [_event(n) for n in range(40)]
        for e in events:
            spool.append(INBOUND, e)
        publisher = Publisher(kafka)
        drainer = Drainer(spool, publisher.publish_many, batch=7)
        drainer.begin()
        consumer = make_consumer(kafka, group_id="order", topics=[INBOUND])
        try:
            records = consume_until(consumer, lambda got: len(got) >= 40)
        finally:
            consumer.close()
            drainer.end()
            publisher.close(timeout_s=2)
        assert [read_meta(r.headers).id for r in records] == [e.id for e in events]
        assert read_data(records[0].value, InboundMessage).text == "message 0"
        assert spool.messages == 0


def test_a_full_spool_answers_451_and_503(tmp_path: Path) -> None:
    nowhere = KafkaSettings(
        bootstrap=f"127.0.0.1:{free_port()}", max_block_ms=300, request_timeout_ms=500
    )
    spool = _spool(tmp_path / "s.sqlite3", max_messages=2)
    with smtp_server(nowhere, tmp_path, spool=spool, spool_after_s=0.5) as smtp:
        assert smtp.send(_email(1))[0] == 250
        assert smtp.send(_email(2))[0] == 250
        code, reply = smtp.send(_email(3))
        assert code == 451
        assert reply.startswith("4.3.0"), reply
    assert spool.messages == 2
    hook = WebhookSettings.model_validate(
        {"name": "open", "auth": {"kind": "none"}, "map": {"email": "email", "text": "text"}}
    )
    with http_ingest(nowhere, tmp_path, hooks=[hook], spool=spool) as app:
        response = local_http.post(
            f"{app.base}/webhooks/open", json={"email": "ann@example.com", "text": "hi"}, timeout=30
        )
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
