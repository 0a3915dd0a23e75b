"""`switchboard run` as a user runs it: a subprocess, real ports, real signals."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from normalize.schema import InboundMessage
from switchboard.blobs import PackBlobStore
from switchboard.broker import BROKER_FILE, EmbeddedBroker, free_port
from switchboard.databases import current_revisions, head_revisions
from switchboard.db import make_engine
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests import local_http
from tests.http_helpers import find
from tests.router_helpers import snapshot
from tests.smtp_helpers import collect, queued_id

pytestmark = pytest.mark.e2e

SWITCHBOARD = [sys.executable, "-m", "switchboard.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_HTTP_PORT=str(free_port()),
        SWITCHBOARD_SMTP_PORT=str(free_port()),
        SWITCHBOARD_DATA_DIR=str(tmp_path / "var"),
        SWITCHBOARD_LOG_FORMAT="json",
        # Sender verification asks DNS, and this machine reaches no DNS outside it:
        # every lookup would wait for its timeout. Tests of verification run their own
        # DNS server on loopback (tests/dns_helpers.py).
        SWITCHBOARD_SMTP_VERIFY="false",
        # A role alone (`ingest http`) on a broker of its own, as these tests want;
        # without it the role refuses (test_a_role_alone_without_kafka_refuses_to_start).
        SWITCHBOARD_KAFKA_EMBEDDED="true",
    )
    env.update(extra)
    return env


@contextmanager
def running(env: dict[str, str], cwd: Path, *command: str) -> Iterator[subprocess.Popen[str]]:
    """`switchboard <command>` (default: run) as a subprocess, killed if still alive."""
    process = subprocess.Popen(
        [*SWITCHBOARD, *(command or ("run",))],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return "(gone)"
    return f"{stat[: stat.index(')') + 3]} {cmdline[:200]}"  # pid (comm) state, command


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_healthy(base: str, process: subprocess.Popen[str], within_s: float = 60.0) -> float:
    # A hang guard, not a timing claim: readiness takes 3-8 s here, and it timed out
    # at 15 s twice on a machine at load 5.
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        assert process.poll() is None, f"switchboard run exited early:\n{process.stderr.read()}"  # type: ignore[union-attr]
        try:
            # Ready: every component (SMTP, router, sinks...) serves, not only HTTP.
            if local_http.get(f"{base}/readyz", timeout=3).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"/readyz did not answer 200 within {within_s}s")


def switchboard_command(
    env: dict[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`switchboard <args>` as a user runs it; the exit code and both outputs kept."""
    return subprocess.run(
        [*SWITCHBOARD, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def switchboard_status(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`switchboard status` as a user runs it."""
    return switchboard_command(env, cwd, "status")


def _stop(process: subprocess.Popen[str]) -> tuple[int, float, str]:
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=15)
    return process.returncode, time.monotonic() - started, stderr


@pytest.mark.slow
def test_run_on_the_embedded_broker_serves_health_and_stops_cleanly(tmp_path: Path) -> None:
    env = _env(tmp_path)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path) as process:
        _wait_healthy(base, process)
        ready = local_http.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"kafka": "ok", "database": "ok", "components": "ok"}
        broker_pids = _children(process.pid)
        assert broker_pids, "the embedded broker should run as a child process"
        started = {pid: _cmdline(pid) for pid in broker_pids}

        code, took, stderr = _stop(process)
    assert code == 0, stderr
    assert took < 10, f"SIGTERM took {took:.1f}s"
    assert "keeps data in memory only" in stderr
    # The parse process exits when switchboard's end of its socket closes: a few
    # milliseconds after, more on a loaded machine. Lingering is what must not happen.
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in broker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {pid: _cmdline(pid) for pid in broker_pids if _alive(pid)}
    assert not survivors, f"children outlived switchboard: {survivors} of {started}"
    assert (tmp_path / "var" / "switchboard.db").is_file()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'switchboard.db'}")
    try:  # run applied the migrations
        assert current_revisions(engine) == head_revisions()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_run_on_a_configured_broker_and_postgres_reports_readiness(
    tmp_path: Path, postgres_schema_url: str
) -> None:
    broker = EmbeddedBroker().start()
    env = _env(
        tmp_path,
        SWITCHBOARD_KAFKA_BOOTSTRAP=broker.bootstrap,
        SWITCHBOARD_DATABASE_URL=postgres_schema_url,
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    try:
        with running(env, tmp_path) as process:
            _wait_healthy(base, process)
            assert local_http.get(f"{base}/readyz", timeout=5).status_code == 200
            # Children there are: the SMTP parse worker (started with the server).
            commands = [Path(f"/proc/{p}/cmdline").read_bytes() for p in _children(process.pid)]
            assert not [c for c in commands if b"tansu" in c], "no embedded broker when configured"

            broker.stop()
            time.sleep(1.2)  # readiness results are cached for 1 s
            unready = local_http.get(f"{base}/readyz", timeout=10)
            assert unready.status_code == 503
            assert unready.json()["checks"]["kafka"] != "ok"
            assert unready.json()["checks"]["database"] == "ok"
            assert local_http.get(f"{base}/healthz", timeout=5).status_code == 200

            code, took, stderr = _stop(process)
        assert code == 0, stderr
        assert took < 10
        assert "keeps data in memory only" not in stderr
    finally:
        broker.stop()


@pytest.mark.slow
def test_an_edge_spooling_while_kafka_is_away_stays_ready_until_its_spool_is_full(
    tmp_path: Path,
) -> None:
    """Its /readyz answered 503 while it took every message into its spool, so a load
    balancer pulled every edge exactly when the spool was there for the outage
    (operator review, 2026-12-01). Ready and "degraded" while the spool has room."""
    broker = EmbeddedBroker().start()
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[[webhooks]]\nname = "contact"\nauth = { kind = "none" }\n'
        'map = { email = "email", text = "text" }\n'
    )
    env = _env(
        tmp_path,
        SWITCHBOARD_KAFKA_BOOTSTRAP=broker.bootstrap,
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_SPOOL_MAX_MESSAGES="2",
        SWITCHBOARD_SPOOL_AFTER_S="0.5",
    )
    env.pop("SWITCHBOARD_KAFKA_EMBEDDED")
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    try:
        with running(env, tmp_path, "ingest", "http", "--workers", "1") as process:
            _wait_healthy(base, process)
            broker.stop()
            time.sleep(1.2)  # readiness results are cached for 1 s
            degraded = local_http.get(f"{base}/readyz", timeout=10)
            assert degraded.status_code == 200, degraded.text
            assert degraded.json()["checks"]["kafka"].startswith("degraded: Kafka away")
            for n in range(2):
                spooled = local_http.post(
                    f"{base}/webhooks/contact",
                    json={"email": f"ann{n}@example.org", "text": "hello", "id": f"s-{n}"},
                    timeout=30,
                )
                assert spooled.status_code == 202, spooled.text
            time.sleep(1.2)
            full = local_http.get(f"{base}/readyz", timeout=10)
            assert full.status_code == 503, full.text  # no room left: not ready
            code, _, stderr = _stop(process)
        assert code == 0, stderr
    finally:
        broker.stop()


def test_a_port_in_use_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with (
        socket.create_server(("127.0.0.1", int(env["SWITCHBOARD_HTTP_PORT"]))),
        running(env, tmp_path) as process,
    ):
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "could not listen on 127.0.0.1" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_run_accepts_email_over_smtp_and_publishes_it(
    tmp_path: Path, kafka_broker: EmbeddedBroker, unique: str
) -> None:
    config = tmp_path / "switchboard.toml"
    config.write_text('[smtp]\ndomains = ["example.com"]\nhostname = "mx.example.com"\n')
    env = _env(
        tmp_path,
        SWITCHBOARD_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        SWITCHBOARD_CONFIG=str(config),
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    raw = (
        f"From: Alice <alice@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: e2e {unique}\r\nMessage-ID: <{unique}@example.org>\r\n\r\nHello!\r\n"
    ).encode()
    with running(env, tmp_path) as process:
        _wait_healthy(base, process)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as client:
            code, banner = client.ehlo("client.example.org")
            assert code == 250
            assert banner.startswith(b"mx.example.com")
            client.mail("alice@example.org")
            assert client.rcpt("elsewhere@example.net")[0] == 550
            assert client.rcpt("support@example.com")[0] == 250
            code, reply = client.data(raw)
        assert code == 250, reply
        code, _, stderr = _stop(process)
    assert code == 0, stderr
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    inbound, dead = collect(settings, f"e2e-{unique}", {queued_id(reply.decode())})
    assert dead == {}
    [message] = inbound.values()
    assert message.subject == f"e2e {unique}"
    assert message.text == "Hello!"
    assert message.raw is not None
    # The raw mail, appended to the stopped process's pack and read from another.
    blobs = tmp_path / "var" / "blobs"
    assert list((blobs / "packs").glob("*.pack"))
    assert not (blobs / message.raw.sha256[:2]).exists()
    store = PackBlobStore(blobs)
    try:
        assert store.get(message.raw.sha256) == raw
    finally:
        store.close()


def test_a_role_alone_without_kafka_refuses_to_start(tmp_path: Path) -> None:
    """An operator's missing or misspelt SWITCHBOARD_KAFKA_BOOTSTRAP gave an edge an
    in-memory broker of its own: it answered 202 and every message was gone at its
    stop, one warning line the only sign (operator review, 2026-12-01)."""
    env = _env(tmp_path, SWITCHBOARD_KAFKA_BOOTSTRAPS="127.0.0.1:19092")  # the typo
    env.pop("SWITCHBOARD_KAFKA_EMBEDDED")
    for role in (("ingest", "http"), ("router",), ("ingest", "smtp", "--workers", "2")):
        done = switchboard_command(env, tmp_path, *role)
        assert done.returncode != 0, role
        assert "no Kafka: set SWITCHBOARD_KAFKA_BOOTSTRAP" in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "var" / BROKER_FILE).exists()


@pytest.mark.slow
def test_ingest_http_role_accepts_a_signed_sms_and_a_form(
    tmp_path: Path, kafka_broker: EmbeddedBroker, unique: str
) -> None:
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[[webhooks]]\nname = "contact"\n'
        'auth = { kind = "hmac-sha256", secret_env = "E2E_SECRET", allow_replay = true }\n'
        'map = { email = "email", phone = "phone", text = "message" }\n'
        'verified = ["email", "phone"]\n'
    )
    env = _env(
        tmp_path,
        SWITCHBOARD_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_TWILIO_AUTH_TOKEN="old-token,e2e-token",
        E2E_SECRET="e2e-secret",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path, "ingest", "http") as process:
        _wait_healthy(base, process)
        with pytest.raises(ConnectionRefusedError):  # SMTP is not part of `ingest http`
            socket.create_connection(("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"])), 1).close()
        url = f"{base}/webhooks/twilio/sms"
        form = {
            "MessageSid": f"SM{unique:0<32}",
            "From": "+14155550100",
            "To": "+14155550199",
            "Body": "hello by SMS",
        }
        signature = RequestValidator("e2e-token").compute_signature(url, form)
        sms = local_http.post(url, data=form, headers={"x-twilio-signature": signature}, timeout=30)
        assert sms.status_code == 200, sms.text
        body = json.dumps(
            {"email": "ann@example.com", "phone": "+14155550100", "message": f"form {unique}"}
        ).encode()
        digest = hmac.new(b"e2e-secret", body, hashlib.sha256).hexdigest()
        posted = local_http.post(
            f"{base}/webhooks/contact",
            content=body,
            headers={"content-type": "application/json", "x-signature": digest},
            timeout=30,
        )
        assert posted.status_code == 202, posted.text
        code, _, stderr = _stop(process)
        assert code == 0, stderr
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    found = find(
        settings,
        f"e2e-http-{unique}",
        INBOUND,
        InboundMessage,
        lambda m: m.provider_message_id == f"SM{unique:0<32}" or m.text == f"form {unique}",
        count=2,
    )
    assert {m.channel for m in found} == {"sms", "webhook"}
    assert {m.sender.key for m in found} == {"phone:+14155550100", "email:ann@example.com"}


@pytest.mark.slow
def test_run_routes_what_it_accepts_to_one_contact_and_owner(tmp_path: Path) -> None:
    """`make run` as a user starts it: embedded broker, SQLite, the router inside."""
    config = tmp_path / "switchboard.toml"
    config.write_text(
        '[smtp]\ndomains = ["example.com"]\n\n'
        '[[teams]]\nname = "support"\nagents = ["alice", "bob"]\n'
    )
    env = _env(tmp_path, SWITCHBOARD_CONFIG=str(config))
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, tmp_path) as process:
        _wait_healthy(base, process)
        for n in (1, 2):
            raw = (
                f"From: Carla <carla@example.org>\r\nTo: support@example.com\r\n"
                f"Subject: order {n}\r\nMessage-ID: <run-{n}@example.org>\r\n\r\nHi\r\n"
            ).encode()
            with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as c:
                c.sendmail("carla@example.org", ["support@example.com"], raw)
        engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'switchboard.db'}")
        try:
            deadline = time.monotonic() + 30
            snap = snapshot(engine)
            while len(snap.messages) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
                snap = snapshot(engine)
        finally:
            engine.dispose()
        code, _, stderr = _stop(process)
    assert code == 0, stderr
    assert len(snap.messages) == 2
    [(owner, keys)] = snap.contacts.values()
    assert keys == {"email:carla@example.org"}
    assert owner in {"alice", "bob"}
    assert len(set(snap.conversations)) == 1
