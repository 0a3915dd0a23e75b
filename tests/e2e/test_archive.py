"""The archive as an analyst reads it, filled by `switchboard run` as a user runs it.

One process (embedded broker, SQLite, the archive on by default under the data
dir): an email over SMTP and an SMS through the signed Twilio hook from the same
person (two contacts: nothing verified links them), then a public form with both
(claimed: the router suggests the merge), then an agent merges the two and closes
a conversation through the API. DuckDB then reads the Parquet files: every record
of every topic is there exactly once, and each query of docs/analytics.md gives
the answer the scenario implies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from pyiceberg.catalog.sql import SqlCatalog
from twilio.request_validator import RequestValidator

from ingest.journal import read_journal_depth
from switchboard.broker import BROKER_FILE
from switchboard.recovery import read_recovery
from switchboard.topics import ALL_TOPICS
from tests import local_http
from tests.archive_helpers import query
from tests.e2e.test_run import (
    SWITCHBOARD,
    _env,
    _stop,
    _wait_healthy,
    running,
    switchboard_status,
)
from tests.faults.harness import broker_pid_of

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOCS = Path(__file__).parents[2] / "docs" / "analytics.md"
TOKEN = "archive-e2e-token"
ROUTED = "io.switchboard.message.routed.v1"
CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "contact"
auth = { kind = "none" }
map = { email = "email", phone = "phone", text = "message", id = "id" }

[[teams]]
name = "support"
agents = ["alice", "bob"]
"""


def doc_queries() -> dict[str, str]:
    """The named queries of docs/analytics.md (``-- query: <name>`` blocks)."""
    blocks = re.findall(r"```sql\n-- query: (\w+)\n(.*?)```", DOCS.read_text(), re.DOTALL)
    return dict(blocks)


@dataclass
class Archived:
    root: Path
    data_dir: Path
    records: dict[tuple[str, int, int], str | None]  # what the broker holds: coordinates -> ce_id
    email_contact: str
    sms_contact: str
    closed_conversation: str
    env: dict[str, str]


def _until(check: Callable[[], Any], what: str, timeout_s: float = 40) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - e.g. no archive file yet
            value = None
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _broker_records(bootstrap: str) -> dict[tuple[str, int, int], str | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [
            TopicPartition(t, p) for t in ALL_TOPICS for p in consumer.partitions_for_topic(t) or ()
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        found: dict[tuple[str, int, int], str | None] = {}
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, "could not read the topics back"
            for batch in consumer.poll(timeout_ms=1500).values():
                for r in batch:
                    ce_id = dict(r.headers).get("ce_id")
                    found[(r.topic, r.partition, r.offset)] = ce_id.decode() if ce_id else None
        return found
    finally:
        consumer.close()


def _mail(env: dict[str, str], name: str, address: str, subject: str, text: str) -> None:
    """One mail to the run's SMTP server, Message-ID ``<local-1@domain>``."""
    local, domain = address.split("@")
    raw = (
        f"From: {name} <{address}>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{local}-1@{domain}>\r\n\r\n{text}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
        smtp.sendmail(address, ["support@example.com"], raw)


def _sms(base: str, sid: str, phone: str, text: str) -> None:
    """One SMS signed as Twilio signs it (MessageSid ``SM`` + 32 times ``sid``)."""
    url = f"{base}/webhooks/twilio/sms"
    form = {"MessageSid": "SM" + sid * 32, "From": phone, "To": "+14155550199", "Body": text}
    signature = RequestValidator("twilio-e2e").compute_signature(url, form)
    answer = local_http.post(url, data=form, headers={"x-twilio-signature": signature}, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archived]:
    root = tmp_path_factory.mktemp("archive-e2e")
    (root / "switchboard.toml").write_text(CONFIG)
    env = _env(
        root,
        SWITCHBOARD_CONFIG=str(root / "switchboard.toml"),
        SWITCHBOARD_TWILIO_AUTH_TOKEN="twilio-e2e",
        SWITCHBOARD_API_TOKEN=TOKEN,
        SWITCHBOARD_ARCHIVE_ROLL_S="0.5",
        SWITCHBOARD_ARCHIVE_ICEBERG="true",
    )
    data_dir = Path(env["SWITCHBOARD_DATA_DIR"])
    archive = data_dir / "archive"  # the default: no [archive] section at all
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    api = {"authorization": f"Bearer {TOKEN}"}
    with running(env, root) as process:
        try:
            _wait_healthy(base, process, within_s=60)
            _mail(env, "Erin", "erin@example.org", "Refund", "My refund?")
            _sms(base, "e", "+14155550177", "Refund please")

            def routed() -> dict[str, tuple[str, str]]:
                sql = "SELECT channel, contact_id, conversation_id FROM events WHERE type = ?"
                rows = query(archive, sql.replace("?", f"'{ROUTED}'"))
                return {r[0]: (r[1], r[2]) for r in rows} if len(rows) >= 2 else {}

            by_channel = _until(routed, "two routed messages in the archive")
            (email_contact, email_conversation) = by_channel["email"]
            (sms_contact, _) = by_channel["sms"]
            assert email_contact != sms_contact
            form = local_http.post(
                f"{base}/webhooks/contact",
                json={
                    "id": "f-1",
                    "email": "erin@example.org",
                    "phone": "+14155550177",
                    "message": "Still waiting",
                },
                timeout=30,
            )
            assert form.status_code == 202, form.text
            _until(
                lambda: query(archive, "SELECT 1 FROM events WHERE kind = 'merge.suggested'"),
                "the merge suggestion in the archive",
            )
            merged = local_http.post(
                f"{base}/api/contacts/{email_contact}/merge",
                json={"contact_id": sms_contact, "by": "alice"},
                headers=api,
                timeout=30,
            )
            assert merged.status_code == 200, merged.text
            closed = local_http.post(
                f"{base}/api/conversations/{email_conversation}/status",
                json={"status": "closed", "changed_by": "alice"},
                headers=api,
                timeout=30,
            )
            assert closed.status_code == 200, closed.text
            _until(
                lambda: query(
                    archive,
                    "SELECT 1 FROM events WHERE kind = 'contact.merged' "
                    "AND list_contains((SELECT list(status) FROM events), 'closed')",
                ),
                "the merge and the close in the archive",
            )
            # Gina (email) and Hank (SMS): two people an agent merged by mistake, then
            # unmerged; the documented queries must not count them as one customer.
            _mail(env, "Gina", "gina@example.org", "Invoice", "My invoice?")
            _sms(base, "f", "+14155550166", "Where is my parcel")

            def contacts_of(*senders: str) -> list[str]:
                sql = "SELECT data, contact_id FROM events WHERE type = ?"
                rows = query(archive, sql.replace("?", f"'{ROUTED}'"))
                found = [next((c for d, c in rows if sender in d), None) for sender in senders]
                return [str(c) for c in found] if all(found) else []

            gina_contact, hank_contact = _until(
                lambda: contacts_of("gina@example.org", "+14155550166"), "Gina and Hank routed"
            )
            for action in ("merge", "unmerge"):
                undone = local_http.post(
                    f"{base}/api/contacts/{gina_contact}/{action}",
                    json={"contact_id": hank_contact, "by": "alice"},
                    headers=api,
                    timeout=30,
                )
                assert undone.status_code == 200, undone.text
            _until(
                lambda: query(archive, "SELECT 1 FROM events WHERE kind = 'contact.unmerged'"),
                "the unmerge in the archive",
            )
            bootstrap = (data_dir / BROKER_FILE).read_text().strip()
            records = _broker_records(bootstrap)
            _until(
                lambda: len(query(archive, "SELECT 1 FROM events")) >= len(records),
                "every record in the archive",
            )
            yield Archived(
                archive, data_dir, records, email_contact, sms_contact, email_conversation, env
            )
        finally:
            code, _, stderr = _stop(process)
            assert code == 0, stderr[-3000:]


def test_every_record_of_every_topic_is_archived_exactly_once(archived: Archived) -> None:
    rows = query(archived.root, 'SELECT topic, partition, "offset", id FROM events')
    coordinates = [(str(t), int(p), int(o)) for t, p, o, _ in rows]
    assert len(coordinates) == len(set(coordinates))  # nothing twice
    assert {(str(t), int(p), int(o)): i for t, p, o, i in rows} == archived.records
    names = {p.parent.parent.name for p in archived.root.glob("topic=*/date=*/part-*.parquet")}
    assert {"topic=switchboard.inbound.v1", "topic=switchboard.routed.v1"} <= names


def test_the_iceberg_table_scans_the_same_rows(archived: Archived) -> None:
    """pyiceberg, as Spark or Trino would, through the SQL catalog the sink keeps in
    the project's database: every archived row once, nothing else."""
    catalog = SqlCatalog(
        "switchboard",
        uri=f"sqlite:///{archived.data_dir / 'switchboard.db'}",
        warehouse=(archived.root / "_iceberg").as_uri(),
    )

    def same() -> bool:
        table = catalog.load_table("switchboard.events")
        fields = ("topic", "partition", "offset", "id")
        rows = table.scan(selected_fields=fields).to_arrow().to_pylist()
        found = {(r["topic"], r["partition"], r["offset"]): r["id"] for r in rows}
        return len(rows) == len(found) and found == archived.records

    _until(same, "the Iceberg table to hold every archived row once")


def test_contact_events_carry_the_senders_name(archived: Archived) -> None:
    rows = query(
        archived.root,
        "SELECT display_name FROM events"
        " WHERE kind = 'contact.created' AND display_name IS NOT NULL",
    )
    assert ("Erin",) in {tuple(r) for r in rows}


def test_messages_per_channel_per_day(archived: Archived) -> None:
    today = datetime.now(UTC).date()
    rows = query(archived.root, doc_queries()["messages_per_channel_per_day"])
    assert rows == [(today, "email", 2), (today, "sms", 2), (today, "webhook", 1)]


def test_time_to_routed(archived: Archived) -> None:
    rows = query(archived.root, doc_queries()["time_to_routed"])
    assert [(channel, n) for channel, n, *_ in rows] == [("email", 2), ("sms", 2), ("webhook", 1)]
    for _, _, median, p95, most in rows:
        assert 0 <= median <= p95 <= most < 60


def test_customers_on_several_channels(archived: Archived) -> None:
    rows = query(archived.root, doc_queries()["customers_on_several_channels"])
    # Erin: the email contact survived the merge and has the SMS; the form went to
    # one of the two, so all three channels are hers. Gina and Hank were merged and
    # unmerged: two customers of one channel each, not listed (they were, before the
    # query subtracted unmerges: analyst review, 2026-12-01).
    assert rows == [(archived.email_contact, ["email", "sms", "webhook"])]


def test_merges_per_day(archived: Archived) -> None:
    rows = query(archived.root, doc_queries()["merges_per_day"])
    today = datetime.now(UTC).date()
    kinds = {kind: n for day, kind, n in rows if day == today}
    assert kinds["contact.merged"] == 2
    assert kinds["contact.unmerged"] == 1
    suggested = query(
        archived.root,
        "SELECT count(DISTINCT id) FROM events WHERE type = 'io.switchboard.merge.suggested.v1'",
    )
    assert kinds["merge.suggested"] == suggested[0][0] >= 1
    assert set(kinds) == {"contact.merged", "merge.suggested", "contact.unmerged"}


def test_closed_per_owner(archived: Archived) -> None:
    rows = query(archived.root, doc_queries()["closed_per_owner"])
    owner = query(
        archived.root,
        f"SELECT owner FROM events WHERE type = '{ROUTED}' "  # noqa: S608
        f"AND conversation_id = '{archived.closed_conversation}'",
    )
    assert len(rows) == 1
    assert rows[0][:2] == (owner[0][0], 1)
    assert 0 < rows[0][2] < 120


def test_every_documented_query_is_tested() -> None:
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert len(doc_queries()) == 5
    assert set(doc_queries()) <= tested


def _tail(archived: Archived, *args: str) -> list[str]:
    """`switchboard events tail` in another shell: it finds the broker by the data dir."""
    done = subprocess.run(
        [*SWITCHBOARD, "events", "tail", "--idle-exit", "2", *args],
        env=archived.env,
        cwd=archived.data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_events_tail_from_the_beginning_as_json_lines(archived: Archived) -> None:
    lines = _tail(archived, "--from-beginning", "--json", "--type", "message.routed")
    events = [json.loads(line) for line in lines]
    assert sorted(e["channel"] for e in events) == ["email", "email", "sms", "sms", "webhook"]
    assert all(e["type"] == ROUTED and e["data"]["message"]["id"] for e in events)


def test_events_tail_since_a_time_for_one_contact_in_readable_lines(archived: Archived) -> None:
    lines = _tail(archived, "--since", "10m", "--contact", archived.sms_contact)
    assert lines
    assert all(archived.sms_contact in line for line in lines), lines
    assert any(" message.routed " in line and "channel=sms" in line for line in lines), lines
    assert any(" contact.merged " in line for line in lines), lines


def _archive_lag(base: str) -> dict[str, float]:
    """The archive consumer's lag by topic and partition, from /metrics (its own view:
    what it has read, not what it committed)."""
    text = local_http.get(f"{base}/metrics", timeout=10).text
    lines = re.findall(
        r'^switchboard_consumer_lag\{([^}]*group="switchboard-archive"[^}]*)\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return {labels: float(value) for labels, value in lines}


def test_a_clean_stop_writes_what_the_archive_holds_in_memory(tmp_path: Path) -> None:
    """Files roll every 300 s by default. On `switchboard run`'s embedded broker, rows
    buffered at a stop were gone for good: the broker forgets them, and the next start
    reads a new, empty log. A graceful stop now writes them, and the next start keeps
    them (its new log is shorter than the archive: the files are kept aside)."""
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(tmp_path, SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"))
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    archive = Path(env["SWITCHBOARD_DATA_DIR"]) / "archive"
    email = (
        b"From: Fay <fay@example.org>\r\nTo: support@example.com\r\n"
        b"Subject: Stop\r\nMessage-ID: <fay-stop@example.org>\r\n\r\nStill there?\r\n"
    )
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.sendmail("fay@example.org", ["support@example.com"], email)
        deadline = time.monotonic() + 30
        while True:  # read by the archive: every partition it holds at lag 0, one read
            lag = _archive_lag(base)
            inbound = [v for k, v in lag.items() if 'topic="switchboard.inbound.v1"' in k]
            if inbound and not any(lag.values()) and len(lag) >= 2:
                break
            assert time.monotonic() < deadline, f"the archive did not read the mail: {lag}"
            time.sleep(0.2)
        assert not list(archive.rglob("*.parquet"))  # nothing rolled yet: all in memory
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    rows = query(archive, "SELECT count(*) FROM events WHERE topic = 'switchboard.inbound.v1'")
    assert rows == [(1,)]
    [(data,)] = query(archive, "SELECT data FROM events WHERE topic = 'switchboard.inbound.v1'")
    assert "fay-stop@example.org" in data
    with running(env, tmp_path) as process:  # a new broker: its log starts at 0 again
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.sendmail(
                "fay@example.org", ["support@example.com"], email.replace(b"fay-stop", b"fay-2")
            )
        _archive_read(base, "switchboard.inbound.v1")
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    # Both, once each: the second run's mail has offset 0 of a new log, which the
    # first run's file also starts at; it was taken for archived before (review).
    count = "SELECT count(*) FROM events WHERE topic = 'switchboard.inbound.v1'"
    assert query(archive, count) == [(2,)]
    texts = "SELECT data FROM events WHERE topic = 'switchboard.inbound.v1'"
    assert sorted("fay-2@" in data for (data,) in query(archive, texts)) == [False, True]


def _archive_read(base: str, topic: str, within_s: float = 30) -> None:
    """Wait until the archive consumer has read ``topic`` to its end (every partition
    at lag 0 in /metrics), for a record acknowledged before the call: its gauge is
    set after each poll, at most every 100 ms here, so a second's wait first keeps a
    gauge from before the record from passing for one after it."""
    time.sleep(1.0)
    deadline = time.monotonic() + within_s
    while True:
        lag = {k: v for k, v in _archive_lag(base).items() if f'topic="{topic}"' in k}
        if lag and not any(lag.values()):
            return
        assert time.monotonic() < deadline, f"the archive did not read {topic}: {lag}"
        time.sleep(0.2)


def test_a_mail_kept_for_review_survives_a_crash_of_switchboard_run(tmp_path: Path) -> None:
    """'250 ... kept for review' is an answer too. On the embedded broker the dead
    letter was only in the broker's memory until the archive wrote its file (up to
    roll_s later): a crash meanwhile lost it, and nothing else referenced its raw
    blob. It is now journaled until the archive has written it."""
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(tmp_path, SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"))
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    data_dir = Path(env["SWITCHBOARD_DATA_DIR"])
    nameless = b"From: nobody\r\nSubject: no sender\r\n\r\nwho sent this?\r\n"
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail("")
            smtp.rcpt("support@example.com")
            code, reply = smtp.data(nameless)
        assert code == 250, reply
        assert b"kept for review: no-sender" in reply
        record_id = reply.decode().split("queued as ")[1].split()[0]
        depths = [read_journal_depth(p) for p in (data_dir / "spool").glob("*.sqlite3")]
        assert sum(d.messages for d in depths if d is not None) == 1  # the dead letter
        process.kill()  # the broker dies with it, and the archive's buffer
        process.wait(10)
    # No broker running: the exit says so; the journal is read anyway.
    status = _status(env, tmp_path, check=False)
    assert "journal: 0 messages" in status, status
    assert "1 dead letters not yet archived" in status, status
    with running(env, tmp_path) as process:  # replays the journal, then stops cleanly
        _wait_healthy(base, process, within_s=60)
        _archive_read(base, "switchboard.deadletter.v1")
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    archive = data_dir / "archive"
    letters = query(
        archive,
        "SELECT subject, data FROM events WHERE topic = 'switchboard.deadletter.v1'",
    )
    assert [subject for subject, _ in letters] == [record_id]
    assert "no-sender" in letters[0][1]
    depths = [read_journal_depth(p) for p in (data_dir / "spool").glob("*.sqlite3")]
    assert sum(d.messages for d in depths if d is not None) == 0  # archived: forgotten


def test_a_crash_of_switchboard_run_loses_nothing_the_archive_had_read(tmp_path: Path) -> None:
    """Files roll every 300 s. On the embedded broker a crash (SIGKILL here) lost every
    row the archive held in memory: the broker's log is gone with the process, and the
    journal only brings back what the queue had not applied (an analyst's review,
    2026-12-01). The rows are now also on disk until their file is written, and the
    next start writes them: each event of every topic once."""
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(tmp_path, SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"))
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    data_dir = Path(env["SWITCHBOARD_DATA_DIR"])
    archive = data_dir / "archive"
    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            for n in range(3):
                smtp.sendmail(
                    "hal@example.org",
                    ["support@example.com"],
                    f"From: Hal <hal@example.org>\r\nTo: support@example.com\r\n"
                    f"Subject: crash {n}\r\nMessage-ID: <hal-crash-{n}@example.org>\r\n\r\n"
                    f"hal-crash-{n}\r\n".encode(),
                )
        for topic in ("inbound", "routed", "contacts"):
            _archive_read(base, f"switchboard.{topic}.v1")
        depths = [read_journal_depth(p) for p in (data_dir / "spool").glob("*.sqlite3")]
        deadline = time.monotonic() + 30
        while sum(d.messages for d in depths if d is not None):  # the queue has them all
            assert time.monotonic() < deadline, "the journal kept the mails"
            time.sleep(0.2)
            depths = [read_journal_depth(p) for p in (data_dir / "spool").glob("*.sqlite3")]
        assert not list(archive.rglob("*.parquet"))  # nothing rolled yet: all buffered
        process.kill()  # the broker dies with it
        process.wait(10)
    status = _status(env, tmp_path, check=False)  # no broker: the files are read anyway
    assert "rows buffered on disk, not in a file yet" in status, status
    with running(env, tmp_path) as process:  # writes what was buffered, then runs
        _wait_healthy(base, process, within_s=60)
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    by_topic = dict(
        query(archive, "SELECT topic, count(*) FROM events GROUP BY topic ORDER BY topic")
    )
    assert by_topic.get("switchboard.inbound.v1") == 3, by_topic
    assert by_topic.get("switchboard.routed.v1") == 3, by_topic
    assert by_topic.get("switchboard.contacts.v1", 0) >= 1, by_topic  # Hal's contact
    doubled = query(archive, "SELECT id, count(*) FROM events GROUP BY id HAVING count(*) > 1")
    assert doubled == [], doubled
    texts = query(archive, "SELECT data FROM events WHERE topic = 'switchboard.inbound.v1'")
    assert sorted(re.findall(r"hal-crash-\d", data)[0] for (data,) in texts) == [
        f"hal-crash-{n}" for n in range(3)
    ]
    assert not list(archive.rglob("part-*.parquet")), "the crashed log's files are set aside"


def test_the_archive_keeps_every_record_across_an_embedded_broker_restart(
    tmp_path: Path,
) -> None:
    """Only the embedded broker dies; `switchboard run` starts it again, empty, and
    replays its journal. Before (review of 2026-12-01): the archive's buffer was
    dropped at the rejoin (its records were nowhere else any more), the new log's
    first offsets were taken for archived ones and skipped, and a dead letter could
    be archived twice. Now: every mail once, the dead letter once."""
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    env = _env(tmp_path, SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"))
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    data_dir = Path(env["SWITCHBOARD_DATA_DIR"])

    def mail(smtp: smtplib.SMTP, tag: str) -> None:
        smtp.sendmail(
            "gil@example.org",
            ["support@example.com"],
            f"From: Gil <gil@example.org>\r\nTo: support@example.com\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.org>\r\n\r\n{tag}\r\n".encode(),
        )

    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        port = int(env["SWITCHBOARD_SMTP_PORT"])
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            for n in range(3):
                mail(smtp, f"gil-before-{n}")
            smtp.ehlo()
            smtp.mail("")
            smtp.rcpt("support@example.com")
            code, _ = smtp.data(b"From: nobody\r\nSubject: who?\r\n\r\nno sender\r\n")
            assert code == 250
        _archive_read(base, "switchboard.inbound.v1")
        _archive_read(base, "switchboard.deadletter.v1")
        os.kill(broker_pid_of(process.pid), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "restarted under switchboard" not in str(read_recovery(data_dir)):
            assert process.poll() is None, "switchboard run died with its broker"
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.2)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            for n in range(3):
                mail(smtp, f"gil-after-{n}")
        _archive_read(base, "switchboard.inbound.v1")
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    archive = data_dir / "archive"
    subjects = query(
        archive,
        "SELECT data FROM events WHERE topic = 'switchboard.inbound.v1'",
    )
    tags = sorted(re.findall(r"gil-(?:before|after)-\d", data)[0] for (data,) in subjects)
    assert tags == sorted(
        [f"gil-before-{n}" for n in range(3)] + [f"gil-after-{n}" for n in range(3)]
    )
    letters = query(
        archive, "SELECT count(*) FROM events WHERE topic = 'switchboard.deadletter.v1'"
    )
    assert letters == [(1,)]


def _status(env: dict[str, str], tmp_path: Path, *, check: bool = True) -> str:
    """What `switchboard status` prints."""
    done = switchboard_status(env, tmp_path)
    if check:
        done.check_returncode()
    return done.stdout


def _status_saying(texts: tuple[str, ...], env: dict[str, str], tmp_path: Path) -> str | None:
    """`switchboard status`'s report when it contains every one of ``texts``, else None."""
    report = _status(env, tmp_path)
    return report if all(t in report for t in texts) else None


def test_an_archive_that_cannot_write_says_so_and_catches_up(tmp_path: Path) -> None:
    """A full disk or an expired bucket key: the archive retries for ever and commits
    nothing past what it wrote, so nothing is lost. It used to say so only in its log;
    now `switchboard status` says "FAILING since" with the error, `/metrics` counts
    the failed writes, and both clear when the next file is written."""
    (tmp_path / "switchboard.toml").write_text(CONFIG)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the archive's parent directory should be\n")
    env = _env(
        tmp_path,
        SWITCHBOARD_CONFIG=str(tmp_path / "switchboard.toml"),
        SWITCHBOARD_ARCHIVE_ROOT=str(blocked / "archive"),
        SWITCHBOARD_ARCHIVE_ROLL_S="1",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"

    def failures() -> float:
        text = local_http.get(f"{base}/metrics", timeout=10).text
        found = re.search(r"^switchboard_archive_write_failures_total (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    with running(env, tmp_path) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.sendmail(
                "hal@example.org",
                ["support@example.com"],
                b"From: Hal <hal@example.org>\r\nTo: support@example.com\r\n"
                b"Subject: Disk\r\nMessage-ID: <hal-disk@example.org>\r\n\r\nFull?\r\n",
            )
        # ...and, on the same line, the rows it holds on disk meanwhile (the count was
        # shown only while the archive wrote, not when an operator needs it).
        status = _until(
            lambda: _status_saying(
                ("archive: FAILING since", "rows buffered on disk"), env, tmp_path
            ),
            "the status to say the archive fails, with the rows it holds",
        )
        assert "NotADirectoryError" in status, status
        assert "no file written since" in status, status
        assert failures() > 0
        blocked.unlink()  # the operator frees the disk
        blocked.mkdir()
        status = _until(
            lambda: _status_saying(("archive: last file",), env, tmp_path),
            "the archive to write again",
        )
        assert "FAILING" not in status, status
        written = float(
            re.findall(
                r"^switchboard_archive_files_written_total (\S+)$",
                local_http.get(f"{base}/metrics", timeout=10).text,
                re.MULTILINE,
            )[0]
        )
        assert written > 0
        code, _, stderr = _stop(process)
    assert code == 0, stderr[-3000:]
    rows = query(
        blocked / "archive", "SELECT data FROM events WHERE topic = 'switchboard.inbound.v1'"
    )
    assert len(rows) == 1
    assert "hal-disk@example.org" in rows[0][0]
