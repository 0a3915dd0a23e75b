"""The journal's cost and the recovery it buys, on `switchboard run` (embedded broker).

Usage: PYTHONPATH=. .venv/bin/python bench/journal.py [--emails N] [--posts N]
       [--rounds R] [--in-flight N]

1. Ingest with and without the journal, in one run: `switchboard run` on the
   embedded broker with `SWITCHBOARD_SPOOL_JOURNAL=false` and `=true`, alternated
   for R rounds. SMTP: the corpus and client of bench/smtp_ingest.py (16
   connections). HTTP: JSON form posts to a public hook (`auth = none`) from 32
   concurrent keep-alive connections (httpx). Reports msg/s (median of rounds).
2. Recovery: with the journal, post forms as fast as the hook takes them until the
   journal holds at least N messages the queue does not have yet, SIGKILL
   `switchboard run`, start it again on the same data directory, and time: until it
   is ready (the replay runs before the edges listen), and until every acknowledged
   post is in the queue read model (exactly once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.smtp_ingest import corpus, drive
from ingest.journal import read_journal_depth
from switchboard.broker import free_port, wait_for_port

CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "form"
auth = { kind = "none" }
map = { email = "email", text = "message", id = "id" }
rate_per_s = 1000000
burst = 1000000
"""
SWITCHBOARD = str(Path(sys.executable).with_name("switchboard"))


class Run:
    """One `switchboard run` on the embedded broker in a data directory of its own."""

    def __init__(self, root: Path, *, journal: bool) -> None:
        self.root = root
        (root / "switchboard.toml").write_text(CONFIG)
        self.http = free_port()
        self.smtp = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        self.env.update(
            SWITCHBOARD_CONFIG=str(root / "switchboard.toml"),
            SWITCHBOARD_DATA_DIR=str(root / "var"),
            SWITCHBOARD_HTTP_PORT=str(self.http),
            SWITCHBOARD_SMTP_PORT=str(self.smtp),
            SWITCHBOARD_SMTP_HOSTNAME="bench",
            SWITCHBOARD_SMTP_MAX_SESSIONS_PER_CLIENT="64",  # 16 bench connections, one address
            SWITCHBOARD_SMTP_VERIFY="false",  # no DNS here; bench-smtp-auth measures it
            SWITCHBOARD_LOG_LEVEL="WARNING",
            SWITCHBOARD_SPOOL_JOURNAL=str(journal).lower(),
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until /readyz says ready; return the seconds it took."""
        started = time.perf_counter()
        log = (self.root / "run.log").open("ab")
        self.process = subprocess.Popen([SWITCHBOARD, "run"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    if not wait_for_port("127.0.0.1", self.smtp, 10):
                        raise SystemExit("SMTP not listening")
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"switchboard run not ready; see {self.root / 'run.log'}")

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(30)
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def queued(self) -> int:
        db = sqlite3.connect(f"file:{self.root / 'var' / 'switchboard.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM queue_messages").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def journal(self) -> int:
        depths = [read_journal_depth(p) for p in (self.root / "var" / "spool").glob("*.sqlite3")]
        return sum(d.messages for d in depths if d is not None)


async def post_forms(url: str, ids: range, concurrency: int) -> tuple[int, float]:
    """Post one form per id; return (acknowledged, seconds)."""
    queue = list(ids)
    accepted = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal accepted
            while queue:
                i = queue.pop()
                body = {"id": f"b-{i}", "email": f"c{i % 500}@example.org", "message": f"m {i}"}
                for _ in range(5):  # a sender retries what was not acknowledged
                    try:
                        response = await client.post(f"{url}/webhooks/form", json=body)
                    except httpx.TransportError:
                        continue
                    if response.status_code == 202:
                        accepted += 1
                        break

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted, time.perf_counter() - started


def ingest_round(
    journal: bool, emails: list[bytes], posts: int, offset: int
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as data:
        run = Run(Path(data), journal=journal)
        run.start()
        try:
            asyncio.run(drive(run.smtp, emails[:100], 16))  # warm up
            accepted, took, _ = asyncio.run(drive(run.smtp, emails, 16))
            smtp = accepted / took
            asyncio.run(post_forms(run.url, range(offset, offset + 200), 32))  # warm up
            ok, took = asyncio.run(post_forms(run.url, range(offset + 200, offset + posts), 32))
            http = ok / took
        finally:
            run.stop()
    return smtp, http


def recovery(in_flight: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        run = Run(Path(data), journal=True)
        run.start()
        sent = acked = 0
        try:
            # Until the journal holds `in_flight` messages the queue does not have yet.
            while run.journal() < in_flight and sent < 20 * in_flight:
                ok, _ = asyncio.run(post_forms(run.url, range(sent, sent + 500), 32))
                sent += 500
                acked += ok
            depth = run.journal()
            run.stop(kill=True)
            queued_at_kill = run.queued()
            ready = run.start()
            started = time.perf_counter() - ready
            deadline = time.monotonic() + 300
            while run.queued() < acked and time.monotonic() < deadline:
                time.sleep(0.05)
            visible = time.perf_counter() - started
            report = json.loads((Path(data) / "var" / "recovery.json").read_text())
            queued = run.queued()
        finally:
            run.stop()
    print(
        f"recovery: {acked} of {sent} posts acknowledged, journal {depth} and queue "
        f"{queued_at_kill} at the SIGKILL; replayed {report['replayed_messages']} messages and "
        f"{report['replayed_events']} routed events in {report['seconds']:.2f} s; ready after "
        f"{ready:.1f} s; all {queued} in the queue {visible:.1f} s after the restart"
    )
    if queued != acked:
        raise SystemExit(f"{acked} posts acknowledged, {queued} in the queue")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=1500)
    parser.add_argument("--posts", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--recovery-only", action="store_true")
    parser.add_argument("--in-flight", type=int, default=1000)
    args = parser.parse_args()
    if args.recovery_only:
        recovery(args.in_flight)
        return
    emails = corpus(args.emails)
    rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for journal in (False, True):
            smtp, http = ingest_round(journal, emails, args.posts, r * 10 * args.posts)
            rates[journal].append((smtp, http))
            label = "journal" if journal else "no journal"
            print(f"round {r + 1} {label:<11} smtp {smtp:7,.0f} msg/s   http {http:7,.0f} req/s")
    for journal in (False, True):
        smtp = statistics.median(s for s, _ in rates[journal])
        http = statistics.median(h for _, h in rates[journal])
        print(
            f"median {'journal' if journal else 'no journal':<11} "
            f"smtp {smtp:7,.0f}   http {http:7,.0f}"
        )
    smtp_on = statistics.median(s for s, _ in rates[True])
    smtp_off = statistics.median(s for s, _ in rates[False])
    http_on = statistics.median(h for _, h in rates[True])
    http_off = statistics.median(h for _, h in rates[False])
    print(f"journal / none: smtp {smtp_on / smtp_off:.0%}   http {http_on / http_off:.0%}")
    recovery(args.in_flight)


if __name__ == "__main__":
    main()
