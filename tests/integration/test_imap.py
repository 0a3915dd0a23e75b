"""The IMAP poller against a real Dovecot, the real broker and a real database."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from imapclient import IMAPClient

from ingest.imap_state import ImapStateStore
from ingest.settings import MailboxSettings
from normalize.content import Serialized
from normalize.email import EmailContext, serialize_email
from normalize.schema import DeadLetter, InboundMessage, RecipientRole
from switchboard.broker import EmbeddedBroker, free_port
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.settings import KafkaSettings
from switchboard.topics import DEADLETTER, INBOUND
from tests import local_http
from tests.dovecot import PASSWORD, USER, Dovecot
from tests.http_helpers import find
from tests.imap_helpers import imap_adapter, mail, mailbox, wait_for

pytestmark = pytest.mark.integration


def position(store: ImapStateStore, name: str) -> tuple[int, int]:
    """(UIDVALIDITY, last UID) of a mailbox's INBOX, (0, 0) before the first checkpoint."""
    cp = store.checkpoint(name, "INBOX")
    return (cp.uidvalidity, cp.last_uid) if cp else (0, 0)


def box_status(store: ImapStateStore, name: str) -> dict[str, object]:
    return next(s for s in store.status() if s["mailbox"] == name)


def one_letter_and_one_message(
    kafka: KafkaSettings, box: MailboxSettings, group: str
) -> tuple[DeadLetter, InboundMessage]:
    """The one dead letter and the one message this mailbox produced."""
    [letter] = find(
        kafka, f"{group}-dl", DEADLETTER, DeadLetter, lambda d: d.adapter == f"imap:{box.name}"
    )
    [message] = messages_of(kafka, box.name, group)
    return letter, message


def messages_of(
    kafka: KafkaSettings, name: str, group: str, count: int = 1, timeout_s: float = 20
) -> list[InboundMessage]:
    """The messages read from the mailbox ``name`` (waits for ``count``)."""
    return find(
        kafka,
        group,
        INBOUND,
        InboundMessage,
        lambda m: m.metadata.get("mailbox") == name,
        count=count,
        timeout_s=timeout_s,
    )


def client(dovecot: Dovecot) -> IMAPClient:
    imap = IMAPClient("127.0.0.1", port=dovecot.imap_port, ssl=False)
    imap.login(USER, PASSWORD)
    return imap


@pytest.mark.slow
def test_backfill_ingests_everything_including_seen_mail_and_changes_no_flags(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(3):
        dovecot.deliver(mail(f"{unique}-{i}"))
    reader = client(dovecot)  # a human reads one message in another client first
    reader.select_folder("INBOX")
    reader.add_flags([2], [b"\\Seen"])
    reader.logout()
    box = mailbox(dovecot, f"bf{unique}", monkeypatch.setenv)
    with imap_adapter(kafka_settings, tmp_path, [box]) as store:
        wait_for(lambda: position(store, box.name)[1] >= 3, 20)
    messages = messages_of(kafka_settings, box.name, f"imap-{unique}", count=3)
    assert sorted(m.dedupe_key.split("#")[0] for m in messages) == [
        f"email-mid:{unique}-{i}@example.org" for i in range(3)
    ]
    message = messages[0]
    assert message.adapter == f"imap:{box.name}"
    assert message.metadata["folder"] == "INBOX"
    assert ("support@example.com", RecipientRole.DELIVERED_TO) in {
        (r.value, r.role) for r in message.recipients
    }
    check = client(dovecot)
    check.select_folder("INBOX", readonly=True)
    flags = check.get_flags([1, 2, 3])
    check.logout()
    assert b"\\Seen" not in flags[1]  # BODY.PEEK[]: unread mail stays unread
    assert b"\\Seen" in flags[2]


@pytest.mark.slow
def test_new_mail_arrives_through_idle_within_three_seconds(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = mailbox(dovecot, f"idle{unique}", monkeypatch.setenv, backfill="none")
    with imap_adapter(kafka_settings, tmp_path, [box], poll_interval_s=60) as store:
        wait_for(lambda: store.checkpoint(box.name, "INBOX") is not None, 10)
        wait_for(lambda: any(s["connected"] for s in store.status()), 5)
        dovecot.deliver(mail(f"{unique}-new"))
        took = wait_for(lambda: position(store, box.name)[1] >= 1, 10)
    # Acknowledged by Kafka and checkpointed; polling every 60 s could not do that.
    assert took < 3, f"IDLE pick-up took {took:.2f}s"
    [message] = messages_of(kafka_settings, box.name, f"idle-{unique}")
    assert message.dedupe_key.startswith(f"email-mid:{unique}-new@example.org#")


def test_mail_that_arrives_just_before_idle_starts_is_not_left_waiting(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mail delivered after the poller's search and before its IDLE begins: Dovecot
    announces it only at its own check, 30 s later. The poller searches again at
    least every idle_resync_s, IDLE or not."""
    box = mailbox(dovecot, f"race{unique}", monkeypatch.setenv, backfill="none")
    real_idle = IMAPClient.idle
    raced: list[bool] = []

    def idle_after_a_delivery(self: IMAPClient) -> None:
        if not raced:  # the poller's first IDLE: the mail slips in just before it
            raced.append(True)
            dovecot.deliver(mail(f"{unique}-raced"))
        real_idle(self)

    monkeypatch.setattr(IMAPClient, "idle", idle_after_a_delivery)
    with imap_adapter(kafka_settings, tmp_path, [box], idle_resync_s=2) as store:
        wait_for(lambda: bool(raced), 10)
        took = wait_for(lambda: position(store, box.name)[1] >= 1, 15)
    assert took < 8, f"the mail waited {took:.1f} s"


@pytest.mark.slow
def test_uidvalidity_change_rescans_and_keeps_dedupe_keys(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = mailbox(dovecot, f"uv{unique}", monkeypatch.setenv)
    dovecot.deliver(mail(f"{unique}-a"))
    with imap_adapter(kafka_settings, tmp_path, [box]) as store:
        wait_for(lambda: position(store, box.name)[1] >= 1, 20)
    dovecot.set_uidvalidity(424242)
    dovecot.deliver(mail(f"{unique}-b"))
    with caplog.at_level(logging.WARNING), imap_adapter(kafka_settings, tmp_path, [box]) as store:
        wait_for(
            lambda: position(store, box.name)[0] == 424242 and position(store, box.name)[1] >= 2,
            20,
        )
    assert "UIDVALIDITY changed" in caplog.text
    messages = messages_of(kafka_settings, box.name, f"uv-{unique}", count=3)
    assert len({m.dedupe_key for m in messages}) == 2  # whole keys, digest and all
    keys = [m.dedupe_key.split("#")[0] for m in messages]
    assert sorted(set(keys)) == [
        f"email-mid:{unique}-a@example.org",
        f"email-mid:{unique}-b@example.org",
    ]
    # The re-scan re-published the old message with the same key: the router drops it.
    assert keys.count(f"email-mid:{unique}-a@example.org") == 2


@pytest.mark.slow
def test_server_restart_and_unparseable_mail(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = mailbox(dovecot, f"rs{unique}", monkeypatch.setenv)
    with imap_adapter(kafka_settings, tmp_path, [box]) as store:
        wait_for(lambda: store.checkpoint(box.name, "INBOX") is not None, 20)
        dovecot.stop()
        wait_for(lambda: any(s["last_error"] and not s["connected"] for s in store.status()), 20)
        dovecot.start()  # doveadm needs the running server to deliver
        dovecot.deliver(f"From: nobody\r\nSubject: {unique}\r\n\r\nno sender\r\n".encode())
        dovecot.deliver(mail(f"{unique}-after"))
        wait_for(lambda: position(store, box.name)[1] >= 2, 30)
        # The checkpoint moves per message, the people's counter once per batch,
        # just after it: wait for the counter too rather than racing it.
        wait_for(lambda: box_status(store, box.name)["ingested"] == 2, 10)
        status = box_status(store, box.name)
    assert status["ingested"] == 2
    letter, message = one_letter_and_one_message(kafka_settings, box, f"rs-{unique}")
    assert letter.reason == "no-sender"
    assert letter.raw is not None
    assert message.dedupe_key.startswith(f"email-mid:{unique}-after@example.org#")


@pytest.mark.slow
def test_wrong_password_is_reported_without_the_password(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WRONG_PASSWORD", "hunter2-wrong")
    box = mailbox(dovecot, f"pw{unique}", monkeypatch.setenv, password_env="WRONG_PASSWORD")
    good = mailbox(dovecot, f"ok{unique}", monkeypatch.setenv)
    dovecot.deliver(mail(f"{unique}-1"))
    with (
        caplog.at_level(logging.ERROR),
        imap_adapter(kafka_settings, tmp_path, [box, good]) as store,
    ):
        wait_for(
            lambda: any(s["mailbox"] == box.name and s["last_error"] for s in store.status()), 20
        )
        # One broken mailbox never stops the others.
        wait_for(
            lambda: position(store, good.name)[1] >= 1,
            20,
        )
        status = {s["mailbox"]: s for s in store.status()}
    assert "login failed" in str(status[box.name]["last_error"])
    assert status[box.name]["connected"] is False
    assert f"imap mailbox {box.name}: login failed" in caplog.text
    assert "hunter2-wrong" not in caplog.text
    assert "hunter2-wrong" not in repr(box)


def test_imaps_with_a_trusted_self_signed_certificate(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dovecot.deliver(mail(f"{unique}-tls"))
    untrusted = mailbox(
        dovecot, f"untrusted{unique}", monkeypatch.setenv, port=dovecot.imaps_port, security="tls"
    )
    trusted = mailbox(
        dovecot,
        f"tls{unique}",
        monkeypatch.setenv,
        port=dovecot.imaps_port,
        security="tls",
        ca_file=str(dovecot.cert),
    )
    with imap_adapter(kafka_settings, tmp_path, [untrusted, trusted]) as store:
        wait_for(
            lambda: position(store, trusted.name)[1] >= 1,
            20,
        )
        wait_for(
            lambda: any(s["mailbox"] == untrusted.name and s["last_error"] for s in store.status()),
            20,
        )
        errors = {s["mailbox"]: s["last_error"] for s in store.status()}
    assert "CERTIFICATE_VERIFY_FAILED" in str(errors[untrusted.name])
    assert store.checkpoint(untrusted.name, "INBOX") is None


@pytest.mark.slow
def test_poller_killed_mid_batch_loses_nothing(
    kafka_broker: EmbeddedBroker,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    postgres_schema_url: str,
) -> None:
    """SIGKILL `switchboard ingest imap` mid-batch, restart it: every message is on Kafka,
    any repeat carries the same dedupe key, and the checkpoint (PostgreSQL) is exact."""
    total = 40
    for i in range(total):
        dovecot.deliver(mail(f"{unique}-{i:02d}"))
    name = f"kill{unique}"
    config = tmp_path / "switchboard.toml"
    config.write_text(
        f'[imap]\nbatch_size = 5\nbackoff_max_s = 1\n[[imap.mailboxes]]\nname = "{name}"\n'
        f'host = "127.0.0.1"\nport = {dovecot.imap_port}\nsecurity = "none"\n'
        f'username = "{USER}"\npassword_env = "KILL_TEST_PASSWORD"\nbackfill = "all"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_CONFIG=str(config),
        SWITCHBOARD_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        SWITCHBOARD_DATABASE_URL=postgres_schema_url,
        SWITCHBOARD_DATA_DIR=str(tmp_path / "var"),
        SWITCHBOARD_HTTP_PORT=str(free_port()),
        KILL_TEST_PASSWORD=PASSWORD,
    )
    engine = make_engine(postgres_schema_url)
    upgrade(engine)  # the role would too; the test reads the checkpoints meanwhile
    store = ImapStateStore(engine)

    def last_uid() -> int:
        cp = store.checkpoint(name, "INBOX")
        return cp.last_uid if cp else 0

    argv = [sys.executable, "-m", "switchboard.cli", "ingest", "imap"]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: last_uid() >= 7, 30, step=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = last_uid()
    assert killed_at < total, "the poller finished before it could be killed"
    second = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: last_uid() >= total, 60)
        # The role's HTTP server shows the same state as the CLI.
        status = local_http.get(
            f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}/status/imap", timeout=30
        )
        [live] = [r for r in status.json() if r["mailbox"] == name]
        assert live["connected"] is True
        assert live["folders"]["INBOX"]["last_uid"] == total
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=15)
        assert second.returncode == 0, stderr
    finally:
        if second.poll() is None:
            second.kill()
    kafka = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    messages = messages_of(kafka, name, f"kill-{unique}", count=total, timeout_s=30)
    keys = {m.dedupe_key.split("#")[0] for m in messages}
    assert keys == {f"email-mid:{unique}-{i:02d}@example.org" for i in range(total)}
    # At most the message in flight when killed is published twice.
    assert len(messages) - total <= 1, (len(messages), killed_at)
    shown = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "imap", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    [row] = [r for r in json.loads(shown.stdout) if r["mailbox"] == name]
    assert row["folders"]["INBOX"]["last_uid"] == total
    assert row["connected"] is False  # stopped cleanly


@pytest.mark.slow
def test_optional_keyword_and_move_after_ingest(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = client(dovecot)
    setup.create_folder("Ingested")
    setup.logout()
    dovecot.deliver(mail(f"{unique}-kw"))
    marked = mailbox(dovecot, f"kw{unique}", monkeypatch.setenv, mark_keyword="$Switchboard")
    with imap_adapter(kafka_settings, tmp_path, [marked]) as store:
        wait_for(lambda: position(store, marked.name)[1] >= 1, 20)
    check = client(dovecot)
    check.select_folder("INBOX", readonly=True)
    assert b"$Switchboard" in check.get_flags([1])[1]
    check.logout()

    moved = mailbox(dovecot, f"mv{unique}", monkeypatch.setenv, move_to="Ingested")
    with imap_adapter(kafka_settings, tmp_path / "mv", [moved]) as store:
        wait_for(lambda: position(store, moved.name)[1] >= 1, 20)
    check = client(dovecot)
    assert check.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    assert check.select_folder("Ingested", readonly=True)[b"EXISTS"] == 1
    check.logout()


@pytest.mark.slow
def test_a_reply_heuristics_bomb_does_not_freeze_the_poller(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """60,000 lines of one space under a reply cue made the reply heuristics quadratic
    (minutes of CPU with the GIL held, in the poller's own process); the mail after it
    must arrive as usual."""
    box = mailbox(dovecot, f"rb{unique}", monkeypatch.setenv)
    bomb = (
        (
            "From: mallory@example.net\r\nTo: support@example.com\r\nSubject: hi\r\n"
            f"Message-ID: <{unique}-bomb@example.net>\r\n\r\nOn Monday Bob wrote:\r\n"
        ).encode()
        + b" \r\n" * 60_000
        + b"> quoted\r\n"
    )
    dovecot.deliver(bomb)
    dovecot.deliver(mail(f"{unique}-after"))
    with imap_adapter(kafka_settings, tmp_path, [box], parse_workers=1) as store:
        wait_for(lambda: position(store, box.name)[1] >= 2, 30)
    found = messages_of(kafka_settings, box.name, f"rb-{unique}", count=2)
    assert {m.dedupe_key.split("#")[0] for m in found} == {
        f"email-mid:{unique}-bomb@example.net",
        f"email-mid:{unique}-after@example.org",
    }


@pytest.mark.slow
def test_a_mail_over_the_size_limit_is_dead_lettered_without_being_fetched(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sizes are asked before bodies: a 100 MiB mail fetched with its neighbours grew
    the poller by 855 MiB. Over max_message_size a mail is a dead letter naming its
    UID (it stays on the server), and the mail after it arrives as usual."""
    box = mailbox(dovecot, f"big{unique}", monkeypatch.setenv)
    big = mail(f"{unique}-big") + (b"x" * 998 + b"\r\n") * 300
    dovecot.deliver(big)
    dovecot.deliver(mail(f"{unique}-small"))
    with imap_adapter(kafka_settings, tmp_path, [box], max_message_size=4096) as store:
        wait_for(lambda: position(store, box.name)[1] >= 2, 30)
    letter, message = one_letter_and_one_message(kafka_settings, box, f"big-{unique}")
    assert letter.reason == "too-large"
    assert letter.metadata["uid"] == 1
    assert letter.raw is None
    assert message.dedupe_key.startswith(f"email-mid:{unique}-small@example.org#")


def _hanging_parser(raw: bytes, ctx: EmailContext) -> Serialized:
    """The real parser, except on a marked mail, where it hangs (runs in the parse
    process, imported there by name)."""
    if b"X-Poison: hang" in raw:
        time.sleep(3600)
    return serialize_email(raw, ctx)


@pytest.mark.slow
def test_a_mail_that_hangs_the_parser_is_dead_lettered_and_the_poller_goes_on(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsing runs in a parse process, as for SMTP: a mail that keeps it busy is
    killed at parse_timeout_s, tried once more, then dead-lettered with its raw bytes;
    in the poller's own thread it froze the whole process."""
    monkeypatch.setattr("ingest.imap.serialize_email", _hanging_parser)
    box = mailbox(dovecot, f"hang{unique}", monkeypatch.setenv)
    dovecot.deliver(b"X-Poison: hang\r\n" + mail(f"{unique}-hang"))
    dovecot.deliver(mail(f"{unique}-after"))
    with imap_adapter(
        kafka_settings, tmp_path, [box], parse_workers=1, parse_timeout_s=1.0
    ) as store:
        wait_for(lambda: position(store, box.name)[1] >= 2, 30)
    letter, message = one_letter_and_one_message(kafka_settings, box, f"hang-{unique}")
    assert letter.reason == "normalizer-error"
    assert letter.raw is not None
    assert message.dedupe_key.startswith(f"email-mid:{unique}-after@example.org#")
