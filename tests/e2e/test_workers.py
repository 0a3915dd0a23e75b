"""`switchboard ingest http|smtp --workers N`: several processes on one port, as an
operator runs them: real sockets, a real broker, real signals."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from ingest.spool import Spool, read_depth
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests import local_http
from tests.e2e.test_run import SWITCHBOARD, _alive, _children, _env, _wait_healthy, running
from tests.factories import inbound_message
from tests.router_helpers import inbound_event
from tests.smtp_helpers import collect, queued_id

pytestmark = pytest.mark.e2e

CONFIG = """
[[webhooks]]
name = "contact"
auth = { kind = "none" }
map = { email = "email", text = "message", id = "id" }
rate_per_s = 100000
burst = 100000
"""


def _fleet_env(tmp_path: Path, kafka: KafkaSettings, **extra: str) -> dict[str, str]:
    config = tmp_path / "switchboard.toml"
    config.write_text(CONFIG)
    return _env(
        tmp_path,
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_KAFKA_BOOTSTRAP=str(kafka.bootstrap),
        SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS="2000",
        SWITCHBOARD_KAFKA_HEARTBEAT_INTERVAL_MS="500",
        **extra,
    )


def _workers(pid: int, count: int, within_s: float = 60.0) -> list[int]:
    """The supervisor's worker processes, once there are ``count`` of them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = [p for p in _children(pid) if _alive(p)]
        if len(found) == count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"expected {count} workers, found {_children(pid)}")


def _post(base: str, n: int, tag: str) -> set[uuid.UUID]:
    """``n`` hook posts, each on a connection of its own (the kernel spreads new
    connections over the workers' sockets by the client's port), eight at a time
    (one at a time, 600 posts took most of a minute of the suite)."""

    def one(i: int) -> uuid.UUID:
        reply = local_http.post(
            f"{base}/webhooks/contact",
            json={"email": f"p{i}@example.org", "message": "hello", "id": f"{tag}-{i}"},
            timeout=60,
        )
        assert reply.status_code == 202, reply.text
        return uuid.UUID(reply.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(n)))


def _accepted_total(base: str) -> float:
    text = local_http.get(f"{base}/metrics", timeout=10).text
    prefix = 'switchboard_messages_accepted_total{adapter="webhook:contact",via="kafka"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def _accepted_by_worker(stderr: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "message accepted":
            counts[str(entry.get("worker"))] = counts.get(str(entry.get("worker")), 0) + 1
    return counts


@pytest.mark.slow
def test_two_http_workers_share_the_port_and_a_killed_one_is_replaced(
    tmp_path: Path, kafka_settings: KafkaSettings, unique: str
) -> None:
    env = _fleet_env(tmp_path, kafka_settings)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _wait_healthy(base, process)
        first = _workers(process.pid, 2)
        ids = _post(base, 40, "a")
        inbound, dead = collect(kafka_settings, f"w1-{unique}", ids)
        assert set(inbound) == ids
        assert not dead
        # Whichever worker answers /metrics, it counts the whole fleet.
        assert [_accepted_total(base) for _ in range(6)] == [40.0] * 6

        # A worker SIGKILLed: its socket stays open in the supervisor, so the
        # connections the kernel gives it wait for its successor; none is refused.
        os.kill(first[1], signal.SIGKILL)
        more = _post(base, 20, "b")
        replaced = _workers(process.pid, 2)
        assert first[0] in replaced
        assert first[1] not in replaced
        inbound, dead = collect(kafka_settings, f"w2-{unique}", more)
        assert set(inbound) == more
        assert not dead

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-3000:]
    assert not [p for p in replaced if _alive(p)]
    by_worker = _accepted_by_worker(stderr)
    # Both workers served (the chance that 60 connections all hash to one is 2^-59).
    assert set(by_worker) == {"0", "1"}, by_worker
    assert sum(by_worker.values()) == 60
    assert "worker died; starting another" in stderr
    # No SMTP edge in these processes: each worker (the replacement too) runs uvloop.
    assert stderr.count('"event_loop": "uvloop"') == 3, stderr[-3000:]
    assert '"event_loop": "asyncio"' not in stderr


@pytest.mark.slow
def test_two_smtp_workers_take_mail_on_one_port(
    tmp_path: Path, kafka_settings: KafkaSettings, unique: str
) -> None:
    env = _fleet_env(tmp_path, kafka_settings, SWITCHBOARD_SMTP_DOMAINS="example.com")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    port = int(env["SWITCHBOARD_SMTP_PORT"])
    with running(env, tmp_path, "ingest", "smtp", "--workers", "2") as process:
        _wait_healthy(base, process)
        _workers(process.pid, 2)
        ids = set()
        for i in range(24):
            message = EmailMessage()
            message["From"] = f"Sender {i} <s{i}@example.org>"
            message["To"] = "support@example.com"
            message["Subject"] = f"order {i}"
            message["Message-ID"] = f"<{unique}-{i}@example.org>"
            message.set_content("Where is my order?")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.example.org")
                client.mail(f"s{i}@example.org")
                assert client.rcpt("support@example.com")[0] == 250
                code, reply = client.data(message.as_bytes())
            assert code == 250, reply
            ids.add(queued_id(reply.decode()))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-3000:]
    inbound, dead = collect(kafka_settings, f"w3-{unique}", ids)
    assert set(inbound) == ids
    assert not dead
    assert set(_accepted_by_worker(stderr)) == {"0", "1"}
    # uvloop, as every process (aiosmtpd's STARTTLS works on it: tests/integration/test_smtp.py).
    assert stderr.count('"event_loop": "uvloop"') == 2, stderr[-3000:]


def test_worker_files_and_files_of_workers_no_longer_run_are_drained(
    tmp_path: Path, kafka_settings: KafkaSettings, unique: str
) -> None:
    """Worker 1 drains what worker 1 of the last run spooled; worker 0 drains the
    file of a worker 5 that this fleet of 2 no longer runs."""
    spools = tmp_path / "var" / "spool"
    events = {}
    for name in ("http.1.sqlite3", "http.5.sqlite3"):
        spool = Spool(spools / name, max_bytes=10**8, max_messages=1000)
        event = inbound_event(inbound_message(text=f"left in {name}"))
        spool.append(INBOUND, event)
        spool.close()
        events[name] = event
    env = _fleet_env(tmp_path, kafka_settings)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _wait_healthy(base, process)
        ids = {uuid.UUID(e.subject or "") for e in events.values()}
        inbound, _ = collect(kafka_settings, f"w4-{unique}", ids)
        assert set(inbound) == ids
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            read_depth(spools / name).messages for name in events
        ):
            time.sleep(0.1)
        assert [read_depth(spools / name).messages for name in events] == [0, 0]


def test_an_edge_whose_log_pipe_nobody_reads_still_answers(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """At INFO an edge writes a line per accepted message to stderr. Here stderr is a
    pipe nobody reads until the end: 600 lines are more than its 64 KiB, and an edge
    that wrote them on its event loop stopped answering after about 180 messages."""
    env = _fleet_env(tmp_path, kafka_settings, SWITCHBOARD_LOG_LEVEL="INFO")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "1") as process:
        _wait_healthy(base, process)
        ids = _post(base, 600, "unread")
        assert local_http.get(f"{base}/healthz", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-3000:]
    # Nothing was dropped (10,000 lines wait for the writer): every line is there.
    accepted = [
        json.loads(line)
        for line in stderr.splitlines()
        if line.startswith("{") and '"message accepted"' in line
    ]
    assert {uuid.UUID(entry["message_id"]) for entry in accepted} == ids


def test_a_second_fleet_on_the_same_port_is_refused(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """SO_REUSEPORT alone would let two fleets share a port silently."""
    env = _fleet_env(tmp_path, kafka_settings)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    second = tmp_path / "second"
    second.mkdir()
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as first:
        _wait_healthy(base, first)
        other = dict(env, SWITCHBOARD_DATA_DIR=str(second / "var"))
        with running(other, second, "ingest", "http", "--workers", "2") as process:
            _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1
        assert "could not listen" in stderr
        assert first.poll() is None


def test_a_fleet_waits_for_a_port_another_process_still_holds(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """A fleet restarted right after a SIGKILL can find the port held by the old
    workers for a while (one in an fsync dies only when the disk answers): it waits
    for the port instead of exiting with "Address already in use", which a service
    manager restarting at once turned into a failed service."""
    env = _fleet_env(tmp_path, kafka_settings)
    port = int(env["SWITCHBOARD_HTTP_PORT"])
    holder = socket.create_server(("127.0.0.1", port))  # as a dying worker holds it
    log = tmp_path / "fleet.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*SWITCHBOARD, "ingest", "http", "--workers", "2"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=out,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "port in use by another process; waiting for it" not in log.read_text():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the fleet never said it waits"
            time.sleep(0.05)
        time.sleep(1.0)
        assert process.poll() is None  # still waiting, not failed
        holder.close()
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-2000:]
    finally:
        holder.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_port_lock_refuses_a_second_fleet_even_between_the_probe_and_the_bind(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """The plain-bind probe alone leaves a race (a fleet binding between another's
    probe and its SO_REUSEPORT binds); the lock named after the port closes it."""
    env = _fleet_env(tmp_path, kafka_settings)
    port = env["SWITCHBOARD_HTTP_PORT"]
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lock.bind(f"\0switchboard-fleet 127.0.0.1:{port}")  # as a fleet mid-start holds it
    try:
        with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
            _, stderr = process.communicate(timeout=60)
    finally:
        lock.close()
    assert process.returncode == 1
    assert "another switchboard fleet serves this port" in stderr


def _until_steady(base: str, within_s: float, run: int = 20) -> None:
    """Posts on fresh connections until ``run`` in a row are answered in time."""
    deadline = time.monotonic() + within_s
    streak = 0
    while streak < run:
        assert time.monotonic() < deadline, f"no {run} answers in a row in {within_s} s"
        try:
            reply = local_http.get(f"{base}/healthz", timeout=3)
            streak = streak + 1 if reply.status_code == 200 else 0
        except httpx.HTTPError:
            streak = 0


@pytest.mark.slow
def test_a_hung_worker_is_killed_and_replaced(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    env = _fleet_env(tmp_path, kafka_settings, SWITCHBOARD_WORKER_TIMEOUT_S="5")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _wait_healthy(base, process)
        first = _workers(process.pid, 2)
        _until_steady(base, within_s=60)  # both serve (one still starting would not)
        os.kill(first[1], signal.SIGSTOP)  # alive, holding its socket, answering nothing
        # What the kernel queues on its socket is answered by its successor.
        _until_steady(base, within_s=60)
        assert first[1] not in _workers(process.pid, 2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "worker stopped answering; killing it" in stderr


@pytest.mark.slow
def test_a_worker_that_keeps_dying_stops_taking_connections(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    spools = tmp_path / "var" / "spool"
    spools.mkdir(parents=True)
    (spools / "http.1.sqlite3").write_bytes(b"not a database" * 100)  # worker 1 cannot start
    env = _fleet_env(tmp_path, kafka_settings)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _wait_healthy(base, process)
        # Until its third quick death, half the connections wait for it; then its
        # sockets leave the port's group and worker 0 answers everyone.
        _until_steady(base, within_s=90)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert stderr.count("worker died; starting another") >= 3


def test_systemd_signalling_the_whole_group_stops_every_worker_gracefully(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """KillMode=control-group: SIGTERM to every process, then the supervisor
    forwards its own; a worker must not take the second for a force."""
    env = _fleet_env(tmp_path, kafka_settings)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _wait_healthy(base, process)
        workers = _workers(process.pid, 2)
        _until_steady(base, within_s=60)  # both serve: their handlers are installed
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)  # each worker's handler runs before the second arrives
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert "exiting without waiting" not in stderr
    assert stderr.count('"msg": "stopped"') == 2  # each worker's graceful end


def test_a_worker_that_cannot_start_stops_the_fleet_with_its_error(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = _fleet_env(
        tmp_path, kafka_settings, SWITCHBOARD_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{port}/x"
    )
    with running(env, tmp_path, "ingest", "http", "--workers", "2") as process:
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "worker 0 could not start" in stderr
