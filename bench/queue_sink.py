"""The queue sink's store alone: how fast routed and contact events become the read
model the agents' queue reads.

Usage: PYTHONPATH=. .venv/bin/python bench/queue_sink.py [--people 2500]
       [--per-person 8] [--db sqlite,postgres] [--poll 500] [--digest]
       [--events FILE]

Routes the router bench's population (people writing from 2-3 identities, one
linking form each, so contacts merge; repeats and re-published events) through
``RouterStore`` in-process, keeps the events it produced in order (routed,
duplicate and contact events: what the sink consumes), then applies them to a
fresh read model with ``QueueWriter.apply_many`` in polls of ``--poll`` records
(the sink's poll), timed, without Kafka. Prints events per second, CPU time per
event and SQL statements per event.

With --digest it also prints a digest of every read-model table (rows sorted, the
time an event was applied left out): two versions of the sink that print the same
digest built the same read model from the same events. The population's times and
ids are new on every run; --events FILE keeps the first run's events in FILE and
applies those again on the next runs, so versions can be compared.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, select

from bench.routing import scratch_database
from router.store import RouterStore
from sinks.queue import QueueStore
from sinks.queue_tables import TABLES, applied
from switchboard.bootstrap import quiet_garbage_collector
from switchboard.databases import upgrade
from switchboard.db import make_engine
from tests.router_helpers import CONFIG, population


def routed_events(people: int, per_person: int, root: Path) -> list[tuple[str, str, bytes]]:
    """The population's events as the router publishes them: (type, id, value)."""
    engine = make_engine(f"sqlite:///{root}/router.db", sqlite_immediate=True)
    upgrade(engine)
    store = RouterStore(engine, CONFIG)
    store.sync_owners()
    pop = population(people, per_person)
    found: list[tuple[str, str, bytes]] = []
    for start in range(0, len(pop.messages), 1000):
        for outcome in store.route_batch(pop.messages[start : start + 1000]):
            found.extend((e.type, e.id, e.value()) for e in outcome.events)
    engine.dispose()
    return found


def digest(engine: Engine) -> str:
    h = hashlib.sha256()
    with engine.connect() as c:
        for table in TABLES:
            columns = [col for col in table.c if table is not applied or col.name != "applied_at"]
            rows = sorted(repr(tuple(row)) for row in c.execute(select(*columns)))
            h.update(f"{table.name}:{len(rows)}\n".encode())
            for row in rows:
                h.update(row.encode())
    return h.hexdigest()[:16]


def apply_all(
    url: str, events: list[tuple[str, str, bytes]], poll: int, want_digest: bool
) -> dict[str, Any]:
    engine = make_engine(url, sqlite_immediate=url.startswith("sqlite"))
    upgrade(engine)
    store = QueueStore(engine)
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine, "before_cursor_execute", count)
    threshold = gc.get_threshold()
    quiet_garbage_collector()  # as in the sink process
    wall, cpu = time.perf_counter(), time.process_time()
    applied_n = 0
    for start in range(0, len(events), poll):
        applied_n += sum(store.apply_many(events[start : start + poll]))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.unfreeze()
    gc.set_threshold(*threshold)
    event.remove(engine, "before_cursor_execute", count)
    figures = {
        "rate": len(events) / wall,
        "cpu_us": cpu / len(events) * 1e6,
        "statements": statements / len(events),
        "applied": applied_n,
        "digest": digest(engine) if want_digest else "",
    }
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=2500)
    parser.add_argument("--per-person", type=int, default=8)
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--poll", type=int, default=500)
    parser.add_argument("--digest", action="store_true")
    parser.add_argument("--events", type=Path, help="keep the events here; reuse them if kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.events is not None and args.events.exists():
            events = pickle.loads(args.events.read_bytes())  # noqa: S301 - the bench's own file
        else:
            events = routed_events(args.people, args.per_person, root)
            if args.events is not None:
                args.events.write_bytes(pickle.dumps(events))
        kinds: dict[str, int] = {}
        for kind, _, _ in events:
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"{len(events)} events: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        for db in args.db.split(","):
            with scratch_database(db, root / "queue.db") as url:
                f = apply_all(url, events, args.poll, args.digest)
            print(
                f"{db:9} {f['rate']:>7,.0f} events/s  {f['cpu_us']:>6,.0f} us CPU/event  "
                f"{f['statements']:.1f} statements/event  applied {f['applied']}"
                + (f"  digest {f['digest']}" if f["digest"] else "")
            )


if __name__ == "__main__":
    main()
