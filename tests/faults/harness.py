"""The fault suite's harness: role processes, a broker that can be killed, senders
that behave like real ones, and the end-state check against the queue API.

Every role runs as its own `switchboard` process (ingest smtp, ingest http,
router, sink queue) against one external broker and one PostgreSQL schema, so a
scenario can SIGKILL exactly the part it is about. Senders retry what was not
acknowledged, as MTAs and Twilio do; what counts is the set of messages whose
sender was told "accepted" (SMTP 250, HTTP 2xx).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from twilio.request_validator import RequestValidator

from switchboard.broker import EmbeddedBroker, free_port
from switchboard.config import KafkaSettings
from switchboard.topics import ensure_topics
from tests import local_http

SWITCHBOARD = [sys.executable, "-m", "switchboard.cli"]
TOKEN = "faults-token"
TWILIO_TOKEN = "faults-twilio"
FORM_SECRET = "faults-form"
AGENTS = ("alice", "bob", "carol")
CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "contact"
auth = { kind = "hmac-sha256", secret_env = "FAULTS_FORM_SECRET", allow_replay = true }
map = { email = "email", phone = "phone", text = "message", id = "id" }
verified = ["email", "phone"]  # the company's own signed backend vouches for both
rate_per_s = 100000
burst = 100000

[[teams]]
name = "support"
agents = ["alice", "bob", "carol"]
"""
MARKER = re.compile(r"\bmk-\d+\b")
BODY_TEXT = "Hello, this is"  # in every email body; must never reach a log

ROLES: dict[str, tuple[str, ...]] = {
    "smtp": ("ingest", "smtp"),
    "http": ("ingest", "http"),
    "router": ("router",),
    "router2": ("router",),
    "queue": ("sink", "queue"),
}


@dataclass(frozen=True)
class Person:
    n: int

    @property
    def email(self) -> str:
        return f"person{self.n}@example.org"

    @property
    def phone(self) -> str:
        return f"+1415555{self.n:04d}"


@dataclass
class Summary:
    sent: int
    acknowledged: int
    in_queue: int
    duplicates: int
    lost: int
    contacts_split: int
    bad_owners: int
    missing: list[str] = field(default_factory=list)  # for the failure message

    def line(self, scenario: str) -> str:
        return (
            f"{scenario}: sent {self.sent}, acknowledged {self.acknowledged}, "
            f"in queue {self.in_queue}, duplicates {self.duplicates}, lost {self.lost}"
        )


@dataclass
class Cluster:
    """The broker, the role processes and their settings, for one scenario."""

    root: Path
    database_url: str
    kafka_port: int = field(default_factory=free_port)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    smtp_port: int = field(default_factory=free_port)
    # Tansu forgets what it acknowledged when killed, router events included: a
    # contact.merged event can vanish after the router's directory applied it.
    forgetful_broker: bool = False
    # Processes per edge (`ingest http|smtp --workers`). 1 unless a scenario sets it:
    # the production default (one per core) is a supervisor and two workers per edge,
    # each with its own imports (and, for SMTP, its own parse process), which the
    # scenarios about the router, the sink and the database do not need. The two spool
    # scenarios run fleets of 2, so per-worker spools are drained under faults.
    edge_workers: int | None = 1  # None: the roles' default (bench/e2e.py)

    def __post_init__(self) -> None:
        (self.root / "switchboard.toml").write_text(CONFIG)
        for role in ROLES:
            self.ports[role] = free_port()

    # -- processes -------------------------------------------------------------

    def env(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_CONFIG=str(self.root / "switchboard.toml"),
            SWITCHBOARD_DATA_DIR=str(self.root / "var"),
            SWITCHBOARD_DATABASE_URL=self.database_url,
            SWITCHBOARD_KAFKA_BOOTSTRAP=f"127.0.0.1:{self.kafka_port}",
            SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS="2000",
            SWITCHBOARD_KAFKA_HEARTBEAT_INTERVAL_MS="500",
            SWITCHBOARD_HTTP_PORT=str(self.ports[role]),
            SWITCHBOARD_SMTP_PORT=str(self.smtp_port),
            SWITCHBOARD_SMTP_VERIFY="false",  # no DNS here (see tests/e2e/test_run.py)
            SWITCHBOARD_TWILIO_AUTH_TOKEN=TWILIO_TOKEN,
            SWITCHBOARD_API_TOKEN=TOKEN,
            SWITCHBOARD_SPOOL_AFTER_S="1.0",
            SWITCHBOARD_LOG_LEVEL="INFO",  # every hand-off logged: checked for leaks
            FAULTS_FORM_SECRET=FORM_SECRET,
        )
        if self.edge_workers is not None:
            env["SWITCHBOARD_HTTP_WORKERS"] = env["SWITCHBOARD_SMTP_WORKERS"] = str(
                self.edge_workers
            )
        return env

    def start_broker(self) -> None:
        self.broker = EmbeddedBroker(port=self.kafka_port).start()
        # In this process: `switchboard topics create` cost 3.3 s of CPU a scenario
        # (the command's imports), and tests/e2e/test_cli.py runs the command itself.
        ensure_topics(KafkaSettings(bootstrap=self.broker.bootstrap))

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.stop()  # SIGKILL (see switchboard.broker)
        self.broker = None

    def start(self, role: str) -> None:
        """Start a role at once, as a service manager restarts a killed one (an
        `ingest` fleet finding its port still held by the killed one's workers waits
        for it: switchboard.supervisor.PORT_WAIT_S)."""
        log = (self.root / f"{role}.log").open("ab")
        self.procs[role] = subprocess.Popen(
            [*SWITCHBOARD, *ROLES[role]],
            env=self.env(role),
            cwd=self.root,
            stdout=log,
            stderr=log,
        )
        self.wait_ready(role)

    def wait_ready(self, role: str, within_s: float = 60) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            proc = self.procs[role]
            if proc.poll() is not None:
                raise AssertionError(f"{role} exited with {proc.returncode}: {self.tail(role)}")
            try:
                if local_http.get(f"{self.url(role)}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{role} not ready within {within_s}s: {self.tail(role)}")

    def kill(self, role: str) -> None:
        proc = self.procs.pop(role)
        proc.kill()
        proc.wait(10)

    def stop_all(self) -> None:
        for role in list(self.procs):
            proc = self.procs.pop(role)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.broker is not None:
            self.kill_broker()

    def leaks(self) -> list[str]:
        """Secrets or message bodies found in any role's log (logs carry ids only)."""
        found = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace")
            for secret in (TOKEN, TWILIO_TOKEN, FORM_SECRET, BODY_TEXT):
                if secret in text:
                    found.append(f"{log.name}: {secret!r}")
        return found

    def tail(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    # -- reading the end state ---------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:  # noqa: ANN401 - JSON
        response = local_http.get(
            f"{self.url('queue')}{path}",
            params=params,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=15,
        )
        response.raise_for_status()
        return response.json()

    def queue_messages(self) -> Iterator[dict[str, Any]]:
        """Every message of every conversation of every customer in the team's queue,
        through the API (an item is a customer; its card pages through their messages)."""
        cursor = None
        while True:
            params: dict[str, Any] = {"owner": "support", "status": "all", "limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = self.api("/api/queue", **params)
            for item in page["items"]:
                yield from self.card_messages(item["contact_id"])
            cursor = page["next_cursor"]
            if not cursor:
                return

    def card_messages(self, contact_id: str) -> Iterator[dict[str, Any]]:
        """Every message on a customer's card, page after page (50 a page, the most
        the API gives): reading only the first page, which holds the newest 30 by
        default, counted every older message as missing (bench/e2e.py's saturated
        runs, about 55 messages a customer, until 2026-12-02)."""
        before = None
        while True:
            params: dict[str, Any] = {"limit": 50, **({"before": before} if before else {})}
            card = self.api(f"/api/contacts/{contact_id}/card", **params)
            for conversation in card["conversations"]:
                yield from conversation["messages"]
            before = card["older"]
            if not before:
                return

    def queue_rows(self) -> int | None:
        """Messages in the queue's read model, counted in its table: a cheap first check
        before reading every card through the API (a read of 50 cards every second
        kept a core busy while a scenario waited). None when it cannot be read."""
        url = self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = create_engine(url)
        try:
            with engine.connect() as c:
                return int(c.execute(text("SELECT count(*) FROM queue_messages")).scalar_one())
        except Exception:  # noqa: BLE001 - e.g. not migrated yet: read the API instead
            return None
        finally:
            engine.dispose()

    def markers_in_queue(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for message in self.queue_messages():
            text = f"{message.get('subject') or ''} {message.get('text') or ''}"
            found.update(set(MARKER.findall(text)))
        return found

    def _resolved(self, rows: list[Any]) -> set[str]:
        """The live contacts the router's directory resolves these identity rows to."""
        url = self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = create_engine(url)
        live = set()
        try:
            with engine.connect() as c:
                for _key, contact_id, merged_into in rows:
                    current = merged_into or contact_id
                    while True:  # follow merges to the survivor
                        nxt = c.execute(
                            text("SELECT merged_into FROM contacts WHERE id = :id"),
                            {"id": current},
                        ).scalar()
                        if nxt is None:
                            break
                        current = nxt
                    live.add(str(current))
        finally:
            engine.dispose()
        return live

    def _router_view(self, person: Person) -> list[Any]:
        url = self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = create_engine(url)
        try:
            with engine.connect() as c:
                rows = c.execute(
                    text(
                        "SELECT i.key, i.contact_id, c.merged_into FROM contact_identities i "
                        "JOIN contacts c ON c.id = i.contact_id WHERE i.key IN (:e, :p)"
                    ),
                    {"e": f"email:{person.email}", "p": f"phone:{person.phone}"},
                ).all()
                return [tuple(row) for row in rows]
        finally:
            engine.dispose()

    def contacts_check(self, people: list[Person], linked: set[Person]) -> tuple[int, int]:
        """(linked people whose identities resolve to more than one contact, bad owners).

        Only a form carries both identities; a person who never sent one is
        rightly two contacts (an email address and a phone number)."""
        split = bad = 0
        for person in people:
            ids, owners = set(), set()
            for identity in (f"email:{person.email}", f"phone:{person.phone}"):
                try:
                    contact = self.api("/api/contacts", identity=identity)
                except httpx.HTTPStatusError:
                    continue  # this identity never wrote
                ids.add(contact["id"])
                owners.add(contact["owner"])
            if person in linked and len(ids) > 1:
                view = self._router_view(person)
                if self.forgetful_broker and len(self._resolved(view)) == 1:
                    # The directory merged them; the contact.merged event was then
                    # forgotten by the memory broker before the sink read it.
                    print(f"merge forgotten by the broker: {person} -> {sorted(ids)}")  # noqa: T201
                    continue
                split += 1
                print(f"split: {person} -> {sorted(ids)}: {view}")  # noqa: T201
            bad += any(o not in AGENTS for o in owners)
        return split, bad


class Senders:
    """Email over SMTP, SMS through the signed Twilio hook, and form posts.

    Each message carries a unique marker; a message counts as acknowledged once
    its sender got 250 or 2xx. Unacknowledged sends are retried, as real
    senders do, until acknowledged or the deadline passes.
    """

    def __init__(self, cluster: Cluster, people: int = 25, seed: int = 7) -> None:
        self.cluster = cluster
        self.people = [Person(n) for n in range(people)]
        self.random = random.Random(seed)
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.kinds: dict[str, str] = {}
        self.forms: dict[str, Person] = {}  # accepted form (email + phone) -> its sender
        self._n = 0
        self._lock = threading.Lock()
        self.repeat_after_ack = False  # scenario 6: every request sent twice
        self.plan: list[str] = []  # kinds to send, in order; empty: a random mix

    @property
    def linked(self) -> set[Person]:
        """People whose identities a form linked, counting only acknowledged forms."""
        return {person for marker, person in self.forms.items() if marker in self.acked}

    def _next(self) -> str:
        with self._lock:
            self._n += 1
            marker = f"mk-{self._n}"
            self.sent.add(marker)
            return marker

    def _ack(self, marker: str) -> None:
        with self._lock:
            self.acked.add(marker)

    def one(self, deadline: float) -> None:
        person = self.random.choice(self.people)
        with self._lock:
            planned = self.plan.pop() if self.plan else None
        kind = planned or self.random.choice(("email", "sms", "form"))
        marker = self._next()
        self.kinds[marker] = kind
        send = {"email": self._email, "sms": self._sms, "form": self._form}[kind]
        while time.monotonic() < deadline:
            if send(person, marker):
                self._ack(marker)
                if kind == "form":
                    with self._lock:
                        self.forms[marker] = person
                if self.repeat_after_ack:
                    send(person, marker)  # the sender timed out and retries once
                return
            time.sleep(0.3)

    def run(self, count: int, deadline_s: float = 120, threads: int = 4) -> None:
        deadline = time.monotonic() + deadline_s
        per = [count // threads + (i < count % threads) for i in range(threads)]

        def work(k: int) -> None:
            for _ in range(k):
                self.one(deadline)

        workers = [threading.Thread(target=work, args=(k,)) for k in per]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    # -- one send each; True when acknowledged ----------------------------------

    def _email(self, person: Person, marker: str) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.cluster.smtp_port, timeout=15) as smtp:
                smtp.sendmail(person.email, ["support@example.com"], email_of(person, marker))
            return True
        except (smtplib.SMTPException, OSError):
            return False

    def _sms(self, person: Person, marker: str) -> bool:
        url = f"{self.cluster.url('http')}/webhooks/twilio/sms"
        sid = "SM" + hashlib.sha256(marker.encode()).hexdigest()[:32]
        form = {"MessageSid": sid, "From": person.phone, "To": "+14155550199", "Body": marker}
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, form)
        try:
            response = local_http.post(
                url, data=form, headers={"x-twilio-signature": signature}, timeout=15
            )
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def _form(self, person: Person, marker: str) -> bool:
        body, headers = signed_form(person, marker)
        try:
            response = local_http.post(
                f"{self.cluster.url('http')}/webhooks/contact",
                content=body,
                headers=headers,
                timeout=15,
            )
        except httpx.TransportError:
            return False
        return response.status_code == 202


def email_of(person: Person, marker: str) -> bytes:
    """An email from ``person`` whose subject and body carry ``marker``."""
    return (
        f"From: <{person.email}>\r\nTo: support@example.com\r\n"
        f"Subject: question {marker}\r\nMessage-ID: <{marker}@faults.example.org>\r\n"
        f"\r\n{BODY_TEXT} {marker}.\r\n"
    ).encode()


def signed_form(person: Person, marker: str) -> tuple[bytes, dict[str, str]]:
    """The contact form's JSON body (address and number: it links them) and headers."""
    body = json.dumps(
        {"id": marker, "email": person.email, "phone": person.phone, "message": marker}
    ).encode()
    digest = hmac.new(FORM_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"content-type": "application/json", "x-signature": digest}


def settle(cluster: Cluster, senders: Senders, timeout_s: float = 90) -> Summary:
    """Wait until every acknowledged message is in the queue (or the deadline), then count."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = cluster.queue_rows()
        late = time.monotonic() > deadline
        if rows is None or rows >= len(senders.acked) or late:
            found = cluster.markers_in_queue()  # the API: what agents see, once each?
            lost = senders.acked - set(found)
            if not lost or late:
                break
        time.sleep(1.0)
    # Merges travel on the contacts topic, routed messages on their own: the read
    # model converges, so give the merge events the same grace as the messages.
    while True:
        split, bad = cluster.contacts_check(senders.people, senders.linked)
        if not (split or bad) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    return Summary(
        sent=len(senders.sent),
        acknowledged=len(senders.acked),
        in_queue=sum(1 for m in found if m in senders.sent),
        duplicates=sum(n - 1 for n in found.values() if n > 1),
        lost=len(lost),
        contacts_split=split,
        bad_owners=bad,
        missing=sorted(f"{m} ({senders.kinds.get(m)})" for m in lost)[:20],
    )


def broker_pid_of(parent: int) -> int:
    """The embedded broker: the child of `switchboard run` (pid ``parent``) running
    Tansu's binary."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"broker" in cmdline and b"--storage-engine" in cmdline:
            return int(entry.name)
    raise AssertionError("no embedded broker under switchboard run")
