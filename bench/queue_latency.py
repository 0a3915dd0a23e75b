"""Queue listing and search latency on PostgreSQL (issue 18).

Usage: PYTHONPATH=. .venv/bin/python bench/queue_latency.py [--customers 10000] [--messages 100000]

Fills a fresh schema of the test database (127.0.0.1:5432, `test`) with a read
model as the queue sink leaves it: ``--customers`` open customers for alice, as
many for bob, half as many closed ones for carol, one conversation each (a
second open one for every tenth of alice's), ``--messages`` messages spread over
them (names, subjects and texts from a small vocabulary), an email identity each
and a phone for every other. Rows are written in bulk (the bench measures
reading, not the sink), then ANALYZE.

Then, in process (the SQL and the page's description, no HTTP):

  queue    every page of alice's queue (50 customers a page) walked by cursor
  search   300 queries: a word, two words, a name, an email address in another
           case, a phone number as people type it

and prints p50 / p99 / max in milliseconds, and the plan of the queue's query.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, text

from sinks.queue import QueueStore, q_contacts, q_conversations, q_identities, q_messages
from sinks.search import identity_keys
from switchboard.databases import upgrade
from switchboard.db import make_engine

POSTGRES = os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
FIRST = ["Ann", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory"]
LAST = ["Jones", "Smith", "Brown", "Garcia", "Miller", "Davis", "Wilson", "Moore", "Clark"]
WORDS = [
    "refund",
    "order",
    "invoice",
    "delivery",
    "parcel",
    "password",
    "account",
    "login",
    "shipping",
    "address",
    "payment",
    "card",
    "charge",
    "cancel",
    "subscription",
    "upgrade",
    "broken",
    "screen",
    "battery",
    "warranty",
    "exchange",
    "size",
    "colour",
    "tracking",
    "courier",
    "late",
    "missing",
    "damaged",
    "receipt",
    "discount",
    "code",
]
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def fill(store: QueueStore, customers: int, messages: int, rng: random.Random) -> list[str]:
    """Returns the phone numbers given out (for the search queries)."""
    owners = ["alice"] * customers + ["bob"] * customers + ["carol"] * (customers // 2)
    contacts, conversations, identities, phones = [], [], [], []
    conversation_of: list[tuple[uuid.UUID, uuid.UUID, str]] = []
    for n, owner in enumerate(owners):
        cid = uuid.uuid4()
        at = T0 + timedelta(seconds=rng.randrange(0, 20 * 86400))
        closed = owner == "carol"
        contacts.append(
            {
                "id": cid,
                "owner": owner,
                "owner_at": at,
                "created_at": at,
                "work": "closed" if closed else "open",
                "open_count": 0 if closed else (2 if owner == "alice" and n % 10 == 0 else 1),
                "waiting_since": None if closed else at,
                "wait_key": datetime(9999, 1, 1, tzinfo=UTC) if closed else at,
                "last_activity": at + timedelta(hours=1),
            }
        )
        identities.append({"key": f"email:c{n}@example.org", "contact_id": cid})
        if n % 2 == 0:
            phone = f"+1415{n:07d}"
            phones.append(phone)
            identities.append({"key": f"phone:{phone}", "contact_id": cid})
        for k in range(2 if owner == "alice" and n % 10 == 0 else 1):
            vid = uuid.uuid4()
            conversation_of.append((vid, cid, f"c{n}@example.org"))
            conversations.append(
                {
                    "id": vid,
                    "contact_id": cid,
                    "owner": owner,
                    "status": "closed" if closed else "open",
                    "channels": ["email"] if k == 0 else ["sms"],
                    "oldest_unanswered_at": None if closed else at,
                    "started_at": at,
                    "last_message_at": at + timedelta(hours=1),
                    "last_preview": "",
                    "message_count": 0,
                }
            )
    rows = []
    for _ in range(messages):
        vid, cid, address = rng.choice(conversation_of)
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        rows.append(
            {
                "id": uuid.uuid4(),
                "conversation_id": vid,
                "contact_id": cid,
                "received_at": T0 + timedelta(seconds=rng.randrange(0, 30 * 86400)),
                "channel": "email",
                "sender": f"email:{address}",
                "sender_name": name,
                "subject": " ".join(rng.choices(WORDS, k=3)),
                "text": " ".join(rng.choices(WORDS, k=40)),
                "attachments": [],
                "auto_reply": False,
                "bounce": False,
                "inboxes": ["email:support@example.com"],
                "sender_verified": rng.random() < 0.5,
            }
        )
    with store.engine.begin() as c:
        for table, values in (
            (q_contacts, contacts),
            (q_conversations, conversations),
            (q_identities, identities),
            (q_messages, rows),
        ):
            for start in range(0, len(values), 5000):
                c.execute(insert(table), values[start : start + 5000])
        c.execute(text("ANALYZE"))
    return phones


def timed(samples: Sequence[Callable[[], Any]]) -> list[float]:
    took = []
    for sample in samples:
        started = time.perf_counter()
        sample()
        took.append((time.perf_counter() - started) * 1000)
    return took


def report(name: str, took: list[float]) -> None:
    took = sorted(took)
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    print(
        f"{name:8s} n={len(took):4d}  p50 {statistics.median(took):7.2f} ms  "
        f"p99 {p99:7.2f} ms  max {took[-1]:7.2f} ms"
    )


def search_queries(rng: random.Random, customers: int, phones: list[str]) -> list[str]:
    """A word, two words, a name, an email in another case, a phone as typed."""
    queries: list[str] = []
    for n in range(300):
        kind = n % 5
        if kind == 0:
            queries.append(rng.choice(WORDS))
        elif kind == 1:
            queries.append(f"{rng.choice(WORDS)} {rng.choice(WORDS)}")
        elif kind == 2:
            queries.append(f"{rng.choice(FIRST)} {rng.choice(LAST)}")
        elif kind == 3:
            queries.append(f"C{rng.randrange(customers)}@Example.ORG")
        else:
            digits = rng.choice(phones)[2:]
            queries.append(f"({digits[:3]}) {digits[3:6]}-{digits[6:]}")
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(18)
    schema = f"bench_queue_{uuid.uuid4().hex[:8]}"
    admin = make_engine(POSTGRES)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(f"{POSTGRES}?options=-csearch_path%3D{schema}")
    try:
        upgrade(engine)
        store = QueueStore(engine, {"support": ("alice", "bob", "carol")})
        started = time.perf_counter()
        phones = fill(store, args.customers, args.messages, rng)
        print(
            f"filled {args.customers} open customers for alice ({int(args.customers * 2.5)} "
            f"contacts), {args.messages} messages in {time.perf_counter() - started:.1f} s"
        )
        # Warm the caches once, as a server that has been running would have them.
        store.customers("alice", limit=50)
        store.search("refund", [])
        cursors: list[str | None] = [None]
        while True:
            page = store.customers("alice", limit=50, cursor=cursors[-1])
            if page.next_cursor is None:
                break
            cursors.append(page.next_cursor)
        pages = [lambda cur=cur: store.customers("alice", limit=50, cursor=cur) for cur in cursors]
        report("queue", timed(pages))
        queries = search_queries(rng, args.customers, phones)
        searches = [lambda q=q: store.search(q, identity_keys(q, "US")) for q in queries]
        report("search", timed(searches))
        by_kind: dict[str, list[float]] = {}
        for n, ms in enumerate(timed(searches)):
            kind = ["word", "2 words", "name", "email", "phone"][n % 5]
            by_kind.setdefault(kind, []).append(ms)
        for kind, kind_took in by_kind.items():
            report(f"  {kind}", kind_took)
        with engine.connect() as c:
            plan = c.execute(
                text(
                    "EXPLAIN SELECT * FROM queue_contacts WHERE owner IN ('alice') "
                    "AND merged_into IS NULL AND work = 'open' "
                    "ORDER BY wait_key, last_activity, id LIMIT 51"
                )
            ).scalars()
            print("queue plan:", " / ".join(line.strip() for line in plan))
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
