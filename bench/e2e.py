"""End to end: from the sender's acknowledgement to the message visible in the queue.

Usage: PYTHONPATH=. .venv/bin/python bench/e2e.py [--db sqlite,postgres]
       [--rate 40] [--seconds 30] [--saturate-seconds 20] [--only fixed,saturate,broker-10s]
       [--edge-workers 1] [--fetch-max-wait-ms MS] [--linger-ms MS] [--edge-linger-ms MS]
       [--senders 32] [--generator async|threads]

Every role runs as its own `switchboard` process (ingest smtp, ingest http,
router, sink queue; each edge one process unless --edge-workers says otherwise:
here every role shares the machine's cores) on one embedded Tansu broker, as in the fault suite
(`tests/faults/harness.py`). Senders are email over SMTP and a signed JSON form
hook, half each, from 200 people; each message's id comes back in the
acknowledgement (the SMTP queue id, the hook's 202 body). A watcher polls the
queue's read model (the table `GET /api/conversations/{id}` reads) every 20 ms for
the ids still pending, so latencies carry up to 20 ms of polling resolution.
At the end every acknowledged message is checked through the queue API itself.

Modes:
  saturate    32 senders as fast as they are answered, for --saturate-seconds:
              accepted/s, visible/s over the same window, and the time the
              backlog took to drain after the senders stopped. The senders are
              tasks on one event loop on raw SMTP and HTTP streams (--generator
              async, the default) or threads of smtplib and httpx (--generator
              threads: every saturate figure before 2026-11-30 afternoon).
  fixed       an open-loop load of --rate messages/s for --seconds:
              p50/p99/max from acknowledgement to visible.
  broker-10s  the fixed load with the broker SIGKILLed at half time and restarted
              10 s later: how many messages were spooled, and how long after the
              restart the spools were empty and every spooled message visible.

Tansu here keeps records in memory only: what it had acknowledged and not yet
delivered when it was killed is gone with it (on Kafka with storage it is not).
Those messages are counted apart as "forgotten by the broker", exactly as the
fault suite does, and excluded from the latency figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import smtplib
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
from sqlalchemy import Engine, create_engine, select, text

from ingest.spool import read_depth
from sinks.queue import q_messages
from tests.faults.harness import Cluster, Person, email_of, signed_form
from tests.smtp_helpers import queued_id

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
POLL_S = 0.02
#: A sender's pause after an attempt that was not acknowledged.
RETRY_S = 0.3


def source_address(person: Person) -> str:
    """The loopback address a person's mail comes from (see Load._email)."""
    return f"127.0.{1 + person.n // 250}.{1 + person.n % 250}"


class BenchCluster(Cluster):
    """The fault suite's cluster, with the queue's read model in a database of its own."""

    queue_url: str = ""
    log_level: str = "WARNING"
    fetch_max_wait_ms: int | None = None  # None: the setting's default
    linger_ms: int | None = None  # None: the setting's default
    edge_linger_ms: int | None = None  # None: the setting's default

    def env(self, role: str) -> dict[str, str]:
        env = super().env(role)
        env["SWITCHBOARD_QUEUE_DATABASE_URL"] = self.queue_url
        env["SWITCHBOARD_LOG_LEVEL"] = self.log_level
        if self.fetch_max_wait_ms is not None:
            env["SWITCHBOARD_KAFKA_FETCH_MAX_WAIT_MS"] = str(self.fetch_max_wait_ms)
        if self.linger_ms is not None:
            env["SWITCHBOARD_KAFKA_LINGER_MS"] = str(self.linger_ms)
        if self.edge_linger_ms is not None:
            env["SWITCHBOARD_KAFKA_EDGE_LINGER_MS"] = str(self.edge_linger_ms)
        return env


@dataclass
class Load:
    """Acknowledged messages and when they became visible."""

    cluster: Cluster
    people: list[Person] = field(default_factory=lambda: [Person(n) for n in range(200)])
    acked: dict[uuid.UUID, float] = field(default_factory=dict)
    visible: dict[uuid.UUID, float] = field(default_factory=dict)
    failed_attempts: int = 0
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: How long each acknowledged attempt took the sender, by channel (ms).
    answered_ms: dict[str, list[float]] = field(default_factory=lambda: {"email": [], "form": []})
    _n: int = 0

    def marker(self) -> str:
        with self.lock:
            self._n += 1
            return f"mk-{self._n}"

    def send_one(self, rng: random.Random, give_up_at: float, email: bool | None = None) -> None:
        """One message (an email or a form, by ``rng`` unless ``email`` says), retried
        as a real sender would until acknowledged."""
        person, marker, email = self.pick(rng, email)
        while time.monotonic() < give_up_at:
            sent = time.monotonic()
            message_id = self._email(person, marker) if email else self._form(person, marker)
            if message_id is not None:
                self.record(message_id, "email" if email else "form", sent)
                return
            self.refused()
            time.sleep(RETRY_S)

    def pick(self, rng: random.Random, email: bool | None = None) -> tuple[Person, str, bool]:
        """Who sends next, its marker, and whether by email (by ``rng`` unless
        ``email`` says); both kinds of sender draw the same way."""
        person = rng.choice(self.people)
        return person, self.marker(), rng.random() < 0.5 if email is None else email

    def refused(self) -> None:
        """An attempt not acknowledged (the sender pauses RETRY_S, then retries)."""
        with self.lock:
            self.failed_attempts += 1

    def record(self, message_id: uuid.UUID, channel: str, sent: float) -> None:
        """``message_id`` acknowledged now, ``sent`` at that monotonic time."""
        now = time.monotonic()
        with self.lock:
            self.acked.setdefault(message_id, now)
            self.answered_ms[channel].append((now - sent) * 1000)

    def _email(self, person: Person, marker: str) -> uuid.UUID | None:
        # Each person's mail comes from an address of its own (127.0.1.x), as mail
        # comes from many MTAs: from one address the senders hit the SMTP edge's
        # per-client session limit (10, Postfix's), and each refusal cost them a 0.3 s
        # pause (before 2026-11-30: 1,300 refusals in a 20 s run).
        source = (source_address(person), 0)
        try:
            with smtplib.SMTP(
                "127.0.0.1", self.cluster.smtp_port, timeout=30, source_address=source
            ) as smtp:
                smtp.ehlo("bench.example.org")
                smtp.mail(person.email)
                smtp.rcpt("support@example.com")
                code, reply = smtp.data(email_of(person, marker))
        except (smtplib.SMTPException, OSError):
            return None
        return queued_id(reply.decode()) if code == 250 else None

    def _form(self, person: Person, marker: str) -> uuid.UUID | None:
        body, headers = signed_form(person, marker)
        try:
            response = self.http.post(
                f"{self.cluster.url('http')}/webhooks/contact", content=body, headers=headers
            )
        except httpx.TransportError:
            return None
        return uuid.UUID(response.json()["id"]) if response.status_code == 202 else None

    def watch(self, engine: Engine, stop: threading.Event) -> None:
        """Record when each acknowledged id first appears in the read model."""
        while not stop.is_set():
            with self.lock:
                pending = [i for i in self.acked if i not in self.visible]
            for start in range(0, len(pending), 500):
                chunk = pending[start : start + 500]
                with engine.connect() as c:
                    found = c.execute(select(q_messages.c.id).where(q_messages.c.id.in_(chunk)))
                    now = time.monotonic()
                    with self.lock:
                        for (message_id,) in found:
                            self.visible.setdefault(message_id, now)
            stop.wait(POLL_S)

    def wait_visible(self, timeout_s: float, exclude: set[uuid.UUID] | None = None) -> float:
        """Seconds until every acknowledged id (bar ``exclude``) is visible."""
        exclude = exclude or set()
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            with self.lock:
                missing = set(self.acked) - set(self.visible) - exclude
            if not missing:
                return time.monotonic() - start
            time.sleep(0.05)
        return float("nan")

    def latencies_ms(self, ids: set[uuid.UUID] | None = None) -> list[float]:
        with self.lock:
            chosen = self.acked if ids is None else {i: self.acked[i] for i in ids}
            return sorted(
                (self.visible[i] - t) * 1000 for i, t in chosen.items() if i in self.visible
            )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def open_loop(load: Load, rate: float, seconds: float, give_up_s: float = 60) -> None:
    """Start ``rate`` messages a second for ``seconds``, whatever the answers' speed."""
    rng = random.Random(7)
    total = int(rate * seconds)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        for n in range(total):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seed = rng.random()
            pool.submit(load.send_one, random.Random(seed), time.monotonic() + give_up_s)


def closed_loop(load: Load, senders: int, seconds: float) -> None:
    """``senders`` threads sending back to back for ``seconds``."""
    stop_at = time.monotonic() + seconds

    def work(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < stop_at:
            load.send_one(rng, stop_at + 30)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class _Refused(Exception):
    """A reply that is not the one a sender waits for."""


async def _reply(reader: asyncio.StreamReader, code: bytes) -> bytes:
    """An SMTP reply (every line of a multi-line one); _Refused unless ``code``."""
    lines = []
    while True:
        line = await reader.readline()
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise _Refused(b"".join(lines))
    return b"".join(lines)


class AsyncSenders:
    """The saturate mode's senders as tasks on one event loop, speaking SMTP and
    HTTP/1.1 on raw streams: 32 threads of smtplib and httpx took a third of a core
    at 391 msg/s (2026-11-30), CPU the pipeline under test then did not have. Same
    dialogue as the threads (EHLO, MAIL, RCPT, DATA, QUIT on a connection of its own
    from the person's own address; the signed form on a kept-alive connection), same
    retries, same bookkeeping in ``load``."""

    def __init__(self, load: Load) -> None:
        self.load = load
        http = load.cluster.url("http").removeprefix("http://")
        self.http_host, port = http.rsplit(":", 1)
        self.http_port = int(port)

    async def email(self, person: Person, marker: str) -> uuid.UUID | None:
        source = (source_address(person), 0)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.load.cluster.smtp_port, local_addr=source
            )
        except OSError:
            return None
        try:
            await _reply(reader, b"220")
            for command, code in (
                (b"EHLO bench.example.org", b"250"),
                (f"MAIL FROM:<{person.email}>".encode(), b"250"),
                (b"RCPT TO:<support@example.com>", b"250"),
                (b"DATA", b"354"),
            ):
                writer.write(command + b"\r\n")
                await _reply(reader, code)
            writer.write(email_of(person, marker) + b".\r\n")  # no line starts with "."
            queued = await _reply(reader, b"250")
            writer.write(b"QUIT\r\n")
            await _reply(reader, b"221")
            return queued_id(queued.decode())
        except (_Refused, OSError, asyncio.IncompleteReadError):
            return None
        finally:
            writer.close()

    async def form(
        self,
        person: Person,
        marker: str,
        conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> uuid.UUID | None:
        """``conn``: this sender's kept-alive connection (empty: open one)."""
        body, headers = signed_form(person, marker)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST /webhooks/contact HTTP/1.1\r\nHost: {self.http_host}:{self.http_port}\r\n"
            f"{head}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        try:
            if not conn:
                conn.append(await asyncio.open_connection(self.http_host, self.http_port))
            reader, writer = conn[0]
            writer.write(request)
            status = await reader.readline()
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and "close" in value.lower():
                    close = True
            answer = await reader.readexactly(length)
            if close:
                conn.pop()[1].close()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            if conn:
                conn.pop()[1].close()
            return None
        if status.split(b" ")[1:2] != [b"202"]:
            return None
        return uuid.UUID(json.loads(answer)["id"])

    async def sender(self, k: int, stop_at: float) -> None:
        rng = random.Random(k)
        conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        while time.monotonic() < stop_at:
            person, marker, email = self.load.pick(rng)
            while time.monotonic() < stop_at + 30:
                sent = time.monotonic()
                found = (
                    await self.email(person, marker)
                    if email
                    else await self.form(person, marker, conn)
                )
                if found is not None:
                    self.load.record(found, "email" if email else "form", sent)
                    break
                self.load.refused()
                await asyncio.sleep(RETRY_S)
        for _, writer in conn:
            writer.close()

    def run(self, senders: int, seconds: float) -> None:
        async def main() -> None:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(self.sender(k, stop_at) for k in range(senders)))

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())


def check_through_api(cluster: Cluster, load: Load, exclude: set[uuid.UUID]) -> tuple[int, int]:
    """(acknowledged messages the queue API does not show, shown more than once)."""
    wanted = set(load.acked) - exclude
    seen = Counter(message["id"] for message in cluster.queue_messages())
    missing = sum(1 for i in wanted if str(i) not in seen)
    return missing, sum(n - 1 for n in seen.values() if n > 1)


@dataclass
class Setup:
    name: str
    cluster: BenchCluster
    queue_engine: Engine
    cleanup: list[str]


def make_setup(db: str, root: Path) -> Setup:
    if db == "sqlite":
        # edge_workers None: the roles' default, one per core (the harness's is 1).
        cluster = BenchCluster(root, f"sqlite:///{root / 'router.sqlite3'}", edge_workers=None)
        cluster.queue_url = f"sqlite:///{root / 'queue.sqlite3'}"
        return Setup(db, cluster, create_engine(cluster.queue_url), [])
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
        c.execute(text(f'CREATE SCHEMA "{schema}_q"'))
    admin.dispose()
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    cluster = BenchCluster(root, url, edge_workers=None)
    cluster.queue_url = f"{POSTGRES}?options=-csearch_path%3D{schema}_q"
    engine = create_engine(cluster.queue_url.replace("postgresql://", "postgresql+psycopg://", 1))
    return Setup(db, cluster, engine, [schema, f"{schema}_q"])


def drop(setup: Setup) -> None:
    setup.queue_engine.dispose()
    if not setup.cleanup:
        return
    admin = create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as c:
        for schema in setup.cleanup:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def spool_depth(cluster: Cluster) -> int:
    return sum(read_depth(p).messages for p in (cluster.root / "var" / "spool").glob("*.sqlite3"))


def run_mode(mode: str, db: str, args: argparse.Namespace) -> str:
    tmp = tempfile.mkdtemp(prefix=f"bench-e2e-{db}-{mode}-")
    try:
        setup = make_setup(db, Path(tmp))
        cluster = setup.cluster
        cluster.log_level = "INFO" if args.keep else "WARNING"
        cluster.edge_workers = args.edge_workers
        cluster.fetch_max_wait_ms = args.fetch_max_wait_ms
        cluster.linger_ms = args.linger_ms
        cluster.edge_linger_ms = args.edge_linger_ms
        cluster.start_broker()
        try:
            for role in ("smtp", "http", "router", "queue"):
                cluster.start(role)
            load = Load(cluster)
            stop = threading.Event()
            watcher = threading.Thread(target=load.watch, args=(setup.queue_engine, stop))
            watcher.start()
            try:
                warm = warm_up(load)
                if mode == "saturate":
                    return f"{warm}; {saturate(load, args)}"
                if mode == "fixed":
                    return f"{warm}; {fixed(load, args)}"
                return f"{warm}; {broker_outage(cluster, load, args)}"
            finally:
                stop.set()
                watcher.join()
        finally:
            cluster.stop_all()
            drop(setup)
    finally:
        if args.keep:
            print(f"  logs and files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _verify(load: Load, exclude: set[uuid.UUID] | None = None) -> str:
    missing, doubled = check_through_api(load.cluster, load, exclude or set())
    return f"API check: {missing} missing, {doubled} doubled"


def _answered(load: Load) -> str:
    """How long senders waited for their acknowledgement, p50 / p99 by channel."""
    with load.lock:
        waits = {k: sorted(v) for k, v in load.answered_ms.items()}
    return "answered in " + ", ".join(
        f"{k} {percentile(v, 0.5):.0f} / {percentile(v, 0.99):.0f} ms" for k, v in waits.items()
    )


def warm_up(load: Load) -> str:
    """One email and one form through the just-started pipeline, waited for, then
    left out of every figure: the consumers' first poll waits for their group to
    form (on Tansu half the session timeout, about 1 s here), and the messages
    accepted meanwhile would otherwise fill the first percent of any latency
    figure with start-up (seen: a p99 of 0.6-1.4 s that was only the first second)."""
    started = time.monotonic()
    rng = random.Random(-1)
    for email in (True, False):
        load.send_one(rng, started + 30, email=email)
    with load.lock:
        acknowledged = len(load.acked)
    if acknowledged < 2:
        raise SystemExit("warm-up messages not acknowledged within 30 s")
    if math.isnan(load.wait_visible(60)):
        raise SystemExit("warm-up messages not visible within 60 s")
    with load.lock:
        load.acked.clear()
        load.visible.clear()
        load.failed_attempts = 0
        for waits in load.answered_ms.values():
            waits.clear()
    return f"warm-up: visible {time.monotonic() - started:.1f} s after sending"


def saturate(load: Load, args: argparse.Namespace) -> str:
    start = time.monotonic()
    window = args.saturate_seconds
    if args.generator == "async":
        AsyncSenders(load).run(args.senders, window)
    else:
        closed_loop(load, args.senders, window)
    load.wait_visible(300)
    with load.lock:
        accepted = sum(1 for t in load.acked.values() if t <= start + window)
        visible = sum(1 for t in load.visible.values() if t <= start + window)
        last = max(load.visible.values(), default=start)
    lat = load.latencies_ms()
    return (
        f"accepted {accepted / window:.0f}/s, visible {visible / window:.0f}/s over "
        f"{window:.0f} s; last message visible {last - start - window:.1f} s after the "
        f"senders stopped: {len(load.acked)} end to end in {last - start:.1f} s = "
        f"{len(load.acked) / (last - start):.0f}/s; p50 {percentile(lat, 0.5):.0f} ms, p99 "
        f"{percentile(lat, 0.99):.0f} ms; {load.failed_attempts} failed attempts retried; "
        f"{_answered(load)}; {_verify(load)}"
    )


def fixed(load: Load, args: argparse.Namespace) -> str:
    open_loop(load, args.rate, args.seconds)
    load.wait_visible(120)
    lat = load.latencies_ms()
    return (
        f"{len(load.acked)} at {args.rate}/s: p50 {percentile(lat, 0.5):.0f} ms, "
        f"p99 {percentile(lat, 0.99):.0f} ms, max {lat[-1] if lat else float('nan'):.0f} ms; "
        f"{_verify(load)}"
    )


def broker_outage(cluster: Cluster, load: Load, args: argparse.Namespace) -> str:
    forgotten: set[uuid.UUID] = set()
    peak = {"spooled": 0}
    marks: dict[str, float] = {}

    def fault() -> None:
        time.sleep(args.seconds / 2)
        marks["killed"] = time.monotonic()
        cluster.kill_broker()
        # The memory broker comes back empty, and a consumer that lived through it
        # would fetch from its old positions and skip the new log's first records
        # (seen here: a whole outage's messages skipped). With Kafka's storage the
        # positions stay valid; here router and sink restart with the broker.
        cluster.kill("router")
        cluster.kill("queue")
        # Acknowledged (by the memory broker: nothing is spooled yet) and not in the
        # queue now that router and sink are gone: forgotten with the broker.
        with load.lock:
            forgotten.update(set(load.acked) - set(load.visible))
        while time.monotonic() - marks["killed"] < 10:
            peak["spooled"] = max(peak["spooled"], spool_depth(cluster))
            time.sleep(0.1)
        cluster.start_broker()
        marks["restarted"] = time.monotonic()
        cluster.start("router")
        cluster.start("queue")
        while spool_depth(cluster):
            peak["spooled"] = max(peak["spooled"], spool_depth(cluster))
            time.sleep(0.05)
        marks["spool-empty"] = time.monotonic()

    # The fault runs on this thread: the broker is killed with the thread that
    # started it (see EmbeddedBroker), so a short-lived thread must not start it.
    sender = threading.Thread(target=open_loop, args=(load, args.rate, args.seconds))
    sender.start()
    fault()
    sender.join()
    # What the memory broker forgot never arrives; wait for the rest.
    load.wait_visible(180, exclude=forgotten)
    lost = forgotten - set(load.visible)
    with load.lock:
        during = {i for i, t in load.acked.items() if marks["killed"] <= t <= marks["restarted"]}
        last_of_outage = max((load.visible[i] for i in during if i in load.visible), default=0)
    lat = load.latencies_ms(set(load.acked) - lost)
    return (
        f"{len(load.acked)} acknowledged at {args.rate}/s, {len(during)} during the outage, "
        f"spool peak {peak['spooled']}; spools empty "
        f"{marks['spool-empty'] - marks['restarted']:.1f} s after the restart, every "
        f"outage message visible {last_of_outage - marks['restarted']:.1f} s after it; "
        f"{len(lost)} forgotten by the memory broker; overall p50 "
        f"{percentile(lat, 0.5):.0f} ms, p99 {percentile(lat, 0.99):.0f} ms; "
        f"{load.failed_attempts} failed attempts retried; {_verify(load, lost)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--only", default="saturate,fixed,broker-10s")
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--saturate-seconds", type=float, default=20)
    parser.add_argument("--keep", action="store_true", help="keep each run's logs and files")
    # Every role shares this machine's cores: one process per edge leaves the router
    # and the queue sink theirs (2026-11-29, SQLite saturate: visible 188/s with one,
    # 106/s with the roles' default of one per core, accepted about the same).
    parser.add_argument(
        "--edge-workers",
        type=int,
        default=1,
        help="processes per edge port (ingest http and smtp); default 1",
    )
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        help="the consumers' SWITCHBOARD_KAFKA_FETCH_MAX_WAIT_MS (default: the setting's)",
    )
    parser.add_argument(
        "--senders",
        type=int,
        default=32,
        help="saturate: threads sending back to back (default 32)",
    )
    parser.add_argument(
        "--generator",
        choices=("async", "threads"),
        default="async",
        help="saturate: the senders as tasks on one event loop (default) or as threads "
        "of smtplib and httpx (what figures before 2026-11-30 afternoon used)",
    )
    parser.add_argument(
        "--linger-ms",
        type=int,
        help="the router's and sinks' SWITCHBOARD_KAFKA_LINGER_MS (default: the setting's)",
    )
    parser.add_argument(
        "--edge-linger-ms",
        type=int,
        help="the edges' SWITCHBOARD_KAFKA_EDGE_LINGER_MS (default: the setting's)",
    )
    args = parser.parse_args()
    for db in args.db.split(","):
        for mode in args.only.split(","):
            print(f"{db:8} {mode:10} {run_mode(mode, db, args)}", flush=True)


if __name__ == "__main__":
    main()
