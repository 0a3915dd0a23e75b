"""`make run` with real mail: `switchboard run` on its embedded (memory) broker is
SIGKILLed, or loses only its broker, under load; nothing acknowledged is lost.

One process, as a small team runs it: the embedded broker, SQLite in the data
directory, no SWITCHBOARD_KAFKA_BOOTSTRAP. Emails over SMTP and form posts to a
public hook (`auth = none`) arrive on four threads; the senders retry what was not
acknowledged, as MTAs and browsers' retries do. After each restart every message
acknowledged before the kill is in the queue API exactly once; at the end every
acknowledged message is, the router's and the queue's counts agree, the journal
is empty again and `switchboard status` reports the recoveries.

The scale is FAULTS_JOURNAL_EMAILS / FAULTS_JOURNAL_FORMS (default 160 and 80, to
keep the suite's time; the README's run used 1,000 and 500).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingest.journal import read_journal_depth
from switchboard.broker import free_port
from switchboard.recovery import read_recovery
from tests.faults.harness import SWITCHBOARD, TOKEN, Cluster, Senders, broker_pid_of

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

RUN_CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "contact"
auth = { kind = "none" }
map = { email = "email", phone = "phone", text = "message", id = "id" }
rate_per_s = 100000
burst = 100000

[[teams]]
name = "support"
agents = ["alice", "bob", "carol"]
"""
EMAILS = int(os.environ.get("FAULTS_JOURNAL_EMAILS", "160"))
FORMS = int(os.environ.get("FAULTS_JOURNAL_FORMS", "80"))


@dataclass
class RunCluster(Cluster):
    """`switchboard run`, all roles in one process, on its own embedded broker."""

    def __post_init__(self) -> None:
        (self.root / "switchboard.toml").write_text(RUN_CONFIG)
        self.ports["run"] = free_port()

    def env(self, role: str = "run") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_CONFIG=str(self.root / "switchboard.toml"),
            SWITCHBOARD_DATA_DIR=str(self.root / "var"),
            SWITCHBOARD_HTTP_PORT=str(self.ports["run"]),
            SWITCHBOARD_SMTP_PORT=str(self.smtp_port),
            SWITCHBOARD_SMTP_VERIFY="false",  # no DNS here (see tests/e2e/test_run.py)
            SWITCHBOARD_API_TOKEN=TOKEN,
            SWITCHBOARD_SPOOL_AFTER_S="1.0",
            SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS="2000",
            SWITCHBOARD_KAFKA_HEARTBEAT_INTERVAL_MS="500",
            SWITCHBOARD_LOG_LEVEL="INFO",
        )
        return env

    def url(self, role: str = "run") -> str:
        return f"http://127.0.0.1:{self.ports['run']}"

    def start(self, role: str = "run") -> None:
        log = (self.root / "run.log").open("ab")
        self.procs["run"] = subprocess.Popen(
            [*SWITCHBOARD, "run"], env=self.env(), cwd=self.root, stdout=log, stderr=log
        )
        self.wait_ready("run", within_s=90)

    def broker_pid(self) -> int:
        """The embedded broker: the child of `switchboard run` running Tansu's binary."""
        return broker_pid_of(self.procs["run"].pid)

    def counts(self) -> tuple[int, int]:
        """(messages in the router's directory, messages in the queue read model)."""
        db = sqlite3.connect(f"file:{self.root / 'var' / 'switchboard.db'}?mode=ro", uri=True)
        try:
            routed = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            queued = db.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
        finally:
            db.close()
        return int(routed), int(queued)

    def queue_rows(self) -> int | None:
        try:
            return self.counts()[1]
        except sqlite3.Error:  # not created yet: read the API instead
            return None

    def journal_messages(self) -> int:
        spool = self.root / "var" / "spool"
        depths = [read_journal_depth(p) for p in spool.glob("*.sqlite3")]
        return sum(d.messages for d in depths if d is not None)

    def status(self) -> str:
        done = subprocess.run(
            [*SWITCHBOARD, "status"],
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout


@pytest.fixture
def run(tmp_path: Path) -> Iterator[RunCluster]:
    cluster = RunCluster(tmp_path, database_url="")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop_all()


def _senders(cluster: RunCluster) -> Senders:
    senders = Senders(cluster)
    senders.plan = ["email"] * EMAILS + ["form"] * FORMS
    senders.random.shuffle(senders.plan)
    return senders


def _visible_once(cluster: RunCluster, markers: set[str], within_s: float = 90) -> Counter[str]:
    """Wait until every marker is in the queue API; return what the queue holds."""
    deadline = time.monotonic() + within_s
    while True:
        late = time.monotonic() > deadline
        rows = cluster.queue_rows()  # the table first: cheap
        if rows is None or rows >= len(markers) or late:
            found = cluster.markers_in_queue()
            if markers <= set(found) or late:
                break
        time.sleep(0.5)
    missing = sorted(markers - set(found))
    assert not missing, f"acknowledged, not in the queue: {len(missing)}: {missing[:20]}"
    doubled = {m: n for m, n in found.items() if m in markers and n > 1}
    assert not doubled, f"in the queue more than once: {doubled}"
    return found


def _recovered(cluster: RunCluster, count: int, within_s: float = 60) -> None:
    """Wait until `switchboard run` reports ``count`` completed recoveries."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        report = read_recovery(cluster.root / "var") or {}
        if int(report.get("recoveries", 0)) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"recovery {count} not reported in {within_s}s: {report}")


def _wait_acked(senders: Senders, count: int, load: threading.Thread) -> bool:
    """Until ``count`` messages are acknowledged; False if the load ended first."""
    while len(senders.acked) < count:
        if not load.is_alive():
            return False
        time.sleep(0.05)
    return True


def _settled(cluster: RunCluster, senders: Senders) -> None:
    found = _visible_once(cluster, set(senders.acked))
    assert sum(found.values()) == len(found), "a message is in the queue twice"
    deadline = time.monotonic() + 60
    while cluster.journal_messages() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.journal_messages() == 0, "the journal kept what the queue has"
    routed, queued = cluster.counts()
    assert routed == queued, f"router {routed} messages, queue {queued}"
    assert queued == len(found), f"queue rows {queued}, markers {len(found)}"
    assert not cluster.leaks(), cluster.leaks()


def test_switchboard_run_sigkilled_five_times_under_load(run: RunCluster) -> None:
    senders = _senders(run)
    total = EMAILS + FORMS
    load = threading.Thread(target=senders.run, args=(total,), kwargs={"deadline_s": 300})
    load.start()
    kills = 0
    try:
        for k in range(1, 6):
            if not _wait_acked(senders, total * k // 7, load):
                break
            run.kill("run")  # SIGKILL: the broker dies with it, and its memory
            before = set(senders.acked)
            kills += 1
            run.start()
            _visible_once(run, before)
    finally:
        load.join()
    assert kills == 5, f"the load ended after {kills} kills"
    assert len(senders.acked) == total, "a sender gave up"
    _settled(run, senders)
    status = run.status()
    assert "messages replayed from the journal" in status, status
    assert "the embedded broker lost its memory" in status, status
    assert " lag -" not in status, status
    assert "lag unknown" not in status, status
    print(  # noqa: T201 - the suite's report line
        f"run-killed x{kills}: sent {len(senders.sent)}, acknowledged {len(senders.acked)}, "
        f"in queue {sum(run.markers_in_queue().values())}, lost 0, duplicates 0"
    )


def test_embedded_broker_killed_twice_under_load(run: RunCluster) -> None:
    senders = _senders(run)
    total = EMAILS + FORMS
    pid = run.procs["run"].pid
    load = threading.Thread(target=senders.run, args=(total,), kwargs={"deadline_s": 300})
    load.start()
    kills = 0
    try:
        for k in (1, 2):
            if not _wait_acked(senders, total * k // 3, load):
                break
            os.kill(run.broker_pid(), 9)  # only the broker: switchboard lives on
            before = set(senders.acked)
            kills += 1
            _visible_once(run, before)
            # The next kill finds a recovered broker: a kill while the last one
            # starts or replays is the recovery's own test (tests/integration/
            # test_journal.py), and would make one recovery of two kills here.
            _recovered(run, kills)
    finally:
        load.join()
    assert kills == 2, f"the load ended after {kills} kills"
    assert run.procs["run"].poll() is None, "switchboard run died with its broker"
    assert run.procs["run"].pid == pid
    assert len(senders.acked) == total, "a sender gave up"
    _settled(run, senders)
    status = run.status()
    assert "embedded broker restarted under switchboard" in status, status
    assert "(2 recoveries" in status, status
    assert " lag -" not in status, status
    assert "lag unknown" not in status, status
    print(  # noqa: T201 - the suite's report line
        f"broker-killed x{kills}: sent {len(senders.sent)}, acknowledged {len(senders.acked)}, "
        f"in queue {sum(run.markers_in_queue().values())}, lost 0, duplicates 0"
    )
