"""What a least-loaded team's open-conversation count costs as the tables grow.

Usage: PYTHONPATH=. .venv/bin/python bench/open_load.py [--rows 600000,60000]
       [--only sqlite,postgres] [--days 90] [--repeat 20]

Fills a fresh database (SQLite file; PostgreSQL at 127.0.0.1:5432, database
`test`, a schema of its own) with ``--rows`` contacts, one conversation each,
their last message spread evenly over the last ``--days`` days, owned by the
three agents of a least-loaded team and seven agents of other teams, then
measures, median of ``--repeat`` runs each:

  count     the router's statement that counts the team's open conversations (the
            ones with a message inside the idle window, 72 h by default)
  batch     ``RouterStore.route_batch`` of 50 messages from 50 new people, each a
            new contact of that team (a poll that creates contacts runs the count
            once)

The count was a join of every conversation with every contact until router_0003
put the owner on the conversation row; the bench runs against either schema (it
writes the owner where the table has one), so the code before can be measured
from a worktree: ``PYTHONPATH=<worktree> python bench/open_load.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text

from bench.routing import scratch_database
from normalize.identity import email_identity, verified
from router.decide import RoutingConfig, Team
from router.directory import _SQL
from router.store import RouterStore
from router.tables import contacts, conversations
from switchboard.databases import upgrade
from switchboard.db import make_engine
from tests.factories import inbound_message

TEAM = ("alice", "bob", "carol")
OTHERS = tuple(f"agent{n}" for n in range(7))
CONFIG = RoutingConfig(
    teams={
        "support": Team("support", TEAM, "least-loaded"),
        "sales": Team("sales", OTHERS),
    },
    default_team="support",
)


def _fill(engine: Engine, rows: int, days: int) -> None:
    """``rows`` contacts and conversations, in slices, with the owner on the
    conversation if the schema has it."""
    owned = "owner" in {c["name"] for c in inspect(engine).get_columns("conversations")}
    agents = TEAM + OTHERS
    now = datetime.now(UTC)
    step = timedelta(days=days) / rows
    size = 20_000
    for start in range(0, rows, size):
        people, talks = [], []
        for n in range(start, min(rows, start + size)):
            contact = uuid.UUID(int=n + 1)
            owner = agents[n % len(agents)]
            at = now - step * n
            people.append({"id": contact, "created_at": at, "owner": owner, "updated_at": at})
            talk: dict[str, Any] = {
                "id": uuid.UUID(int=(1 << 64) + n),
                "contact_id": contact,
                "started_at": at,
                "last_message_at": at,
                "message_count": 1,
            }
            if owned:
                talk["owner"] = owner
            talks.append(talk)
        with engine.begin() as c:
            c.execute(contacts.insert(), people)
            c.execute(conversations.insert(), talks)
    with engine.begin() as c:
        c.execute(text("ANALYZE"))


def _count(c: Connection, dialect: str, window: timedelta) -> float:
    """Seconds for the team's open-conversation count."""
    since = datetime.now(UTC) - window
    started = time.perf_counter()
    c.execute(_SQL[dialect].open_load, {"agents": list(TEAM), "since": since}).all()
    return time.perf_counter() - started


def measure(url: str, rows: int, days: int, repeat: int) -> tuple[float, float]:
    """(median ms of the count, median ms of a 50-new-contact batch)."""
    engine = make_engine(url, sqlite_immediate=url.startswith("sqlite"))
    try:
        upgrade(engine)
        store = RouterStore(engine, CONFIG)
        store.sync_owners()
        _fill(engine, rows, days)
        window = CONFIG.idle_window
        with engine.connect() as c:
            _count(c, engine.dialect.name, window)  # warm the cache
            counts = [_count(c, engine.dialect.name, window) for _ in range(repeat)]
        batches = []
        for b in range(repeat):
            batch = [
                inbound_message(
                    sender=verified(email_identity(f"new{b}-{n}@example.org"), "bench"),
                    identities=(),
                    attachments=(),
                    received_at=datetime.now(UTC),
                    dedupe_key=f"email-mid:new{b}.{n}@example.org",
                )
                for n in range(50)
            ]
            started = time.perf_counter()
            store.route_batch(batch)
            batches.append(time.perf_counter() - started)
        return statistics.median(counts) * 1000, statistics.median(batches) * 1000
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="600000,60000")
    parser.add_argument("--only", default="sqlite,postgres")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    hours = CONFIG.idle_window / timedelta(hours=1)
    print(
        f"least-loaded team of {len(TEAM)}, idle window {hours:g} h, "
        f"last messages spread over {args.days} days"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            for backend in args.only.split(","):
                with scratch_database(backend, Path(tmp) / f"{rows}.db") as url:
                    count_ms, batch_ms = measure(url, rows, args.days, args.repeat)
                print(
                    f"{backend:8} {rows:>9,} conversations: count {count_ms:8.2f} ms, "
                    f"batch of 50 new contacts {batch_ms:8.1f} ms"
                )


if __name__ == "__main__":
    main()
