"""Router throughput against its ceiling, the raw kafka-python consume rate.

Usage: PYTHONPATH=. .venv/bin/python bench/routing.py [--people N] [--per-person K]
       [--only sqlite-1,postgres-1,postgres-2,postgres-4] [--partitions 8]

Publishes one population of messages (people writing from 2-3 identities, one
linking form each, 10% second arrivals, 2% re-published events: the mix of the
concurrency test) to a fresh embedded broker with 8 inbound partitions, then:

  raw-consume   a kafka-python consumer group reading the same records, no work
  sqlite-1      one `switchboard router` process on a SQLite file
  postgres-N    N routers on PostgreSQL (127.0.0.1:5432, database `test`, own
                schema) in one consumer group

A router's rate is the records routed between the first commit the bench sees
and the last one (polled every 20 ms), over the time between them: start-up,
the group join and the first poll's own work are excluded; the wall time with
them is printed beside it. (Until 2026-11-29 the rate was taken between the
first and the last event's timestamp, which also left out most of the first and
last poll's work: a few percent with polls of 500, up to 8% with polls of 2,000.)
Each router's /metrics gives, summed over the routers: SQL statements per
record, the time to take a batch's locks (mean per batch: with several routers,
most of it is waiting for another router's transaction) and the batches
restarted after a conflict.

With --statements, each backend is also measured in-process without Kafka: the
same records through ``RouterStore.route_batch`` in batches of ``[router]
max_poll_records`` (the router's largest poll), with the SQL statements the store sends
(its own counter, ``switchboard_router_sql_statements``, COPY included) and the
time spent in the store.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from kafka import KafkaConsumer
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, make_url, select, text

from router.settings import RouterSettings
from router.store import RouterStore
from router.tables import outbox
from switchboard.bootstrap import ROUTER_SQLITE_CACHE_MB, quiet_garbage_collector
from switchboard.broker import free_port
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests.router_helpers import CONFIG, Population, fresh_kafka, population, publish

POSTGRES = os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TOML = '[[teams]]\nname = "support"\nagents = ["alice", "bob", "carol"]\n'


def raw_consume(kafka: KafkaSettings, n: int) -> float:
    consumer = KafkaConsumer(
        INBOUND,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        max_poll_records=2000,
        **kafka.client_config(),
    )
    seen = 0
    first: float | None = None
    while seen < n:
        for batch in consumer.poll(timeout_ms=1500).values():
            first = first or time.perf_counter()
            seen += len(batch)
    took = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return took


def _done(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count(func.distinct(outbox.c.message_id)))).scalar_one())


def _span(engine: Engine) -> float:
    with engine.connect() as c:
        first, last = c.execute(select(func.min(outbox.c.time), func.max(outbox.c.time))).one()
    return float((last - first).total_seconds())


def _metrics(port: int) -> dict[str, float]:
    """The router figures of one process's /metrics."""
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    wanted = (
        "switchboard_router_sql_statements_total",
        "switchboard_router_lock_seconds_sum",
        "switchboard_router_lock_seconds_count",
        "switchboard_router_batch_restarts_total",
        "switchboard_router_decisions_total",
        "process_resident_memory_bytes",
    )
    found = dict.fromkeys(wanted, 0.0)
    for line in body.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


def run_routers(
    kafka: KafkaSettings, url: str, routers: int, pop: Population, root: Path
) -> tuple[float, float, dict[str, float]]:
    engine = make_engine(url)
    upgrade(engine)
    (root / "switchboard.toml").write_text(TOML)
    env = {
        **os.environ,
        "SWITCHBOARD_DATABASE_URL": url,
        "SWITCHBOARD_KAFKA_BOOTSTRAP": kafka.bootstrap or "",
        "SWITCHBOARD_HTTP_PORT": "0",
        "SWITCHBOARD_CONFIG": str(root / "switchboard.toml"),
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        "SWITCHBOARD_DATA_DIR": str(root),
        # A router serves the API too; without a token it warns at start-up that
        # loopback clients act as the admin, a line per router between the figures.
        "SWITCHBOARD_API_TOKEN": secrets.token_hex(16),
    }
    started = time.perf_counter()
    ports = [free_port() for _ in range(routers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "router"],
            env={**env, "SWITCHBOARD_HTTP_PORT": str(port)},
            # Not the caller's directory: `-m` puts it first on sys.path, ahead of
            # PYTHONPATH, so a checkout run from there would shadow the code under
            # test (until 2026-11-29 night, comparisons of an older worktree with
            # PYTHONPATH ran the current code in both arms).
            cwd=root,
        )
        for port in ports
    ]
    try:
        target = len(pop.ids)
        first: tuple[float, int] | None = None
        while True:
            done = _done(engine)
            now = time.perf_counter()
            if done and first is None:
                first = (now, done)  # the first poll's commit: its work is not timed
            if done >= target:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a router exited")
            time.sleep(0.02)
        wall = now - started
        if first is not None and done > first[1]:
            # arrivals routed between two commits, over the time between them, as records
            steady = (done - first[1]) / (now - first[0]) * len(pop.messages) / target
        else:  # everything in one poll
            steady = len(pop.messages) / _span(engine)
        figures: dict[str, float] = {}
        for port in ports:
            for name, value in _metrics(port).items():
                figures[name] = figures.get(name, 0.0) + value
        return steady, wall, figures
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        engine.dispose()


def store_pass(url: str, pop: Population) -> tuple[float, float]:
    """(statements per record, records/s) of RouterStore.route_batch alone."""
    engine = make_engine(
        url, sqlite_immediate=url.startswith("sqlite"), sqlite_cache_mb=ROUTER_SQLITE_CACHE_MB
    )
    upgrade(engine)
    store = RouterStore(engine, CONFIG)
    store.sync_owners()
    before = REGISTRY.get_sample_value("switchboard_router_sql_statements_total") or 0.0
    threshold = gc.get_threshold()
    quiet_garbage_collector()  # as in the router process
    started = time.perf_counter()
    size = RouterSettings().poll_records(make_url(url).get_backend_name())
    for start in range(0, len(pop.messages), size):
        store.route_batch(pop.messages[start : start + size])
    took = time.perf_counter() - started
    gc.unfreeze()
    gc.set_threshold(*threshold)
    statements = (
        REGISTRY.get_sample_value("switchboard_router_sql_statements_total") or 0
    ) - before
    engine.dispose()
    n = len(pop.messages)
    return statements / n, n / took


@contextmanager
def scratch_database(backend: str, sqlite_file: Path) -> Iterator[str]:
    """The URL of an empty database for one measurement: ``sqlite_file`` for
    "sqlite", else a schema of its own in the test database, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{sqlite_file}"
        return
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(POSTGRES)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def statement_figures(pop: Population) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("sqlite", "postgres"):
            with scratch_database(backend, Path(tmp) / "store.db") as url:
                per_record, rate = store_pass(url, pop)
            print(
                f"store-{backend:8} {rate:>8,.0f} records/s in-process, "
                f"{per_record:.2f} SQL statements per record"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=2500)
    parser.add_argument("--per-person", type=int, default=8)
    parser.add_argument("--only", default="sqlite-1,postgres-1,postgres-2,postgres-4")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--statements", action="store_true", help="also count SQL statements per record"
    )
    args = parser.parse_args()
    pop = population(args.people, args.per_person, seed=3)
    n = len(pop.messages)
    print(
        f"{n} records ({len(pop.ids)} arrivals, {len(pop.dedupe_keys)} messages) "
        f"from {args.people} people"
    )
    if args.statements:
        statement_figures(pop)
    ceiling = 0.0
    for case in ["raw-consume", *args.only.split(",")]:
        with (
            fresh_kafka(partitions=args.partitions) as kafka,
            tempfile.TemporaryDirectory() as tmp,
        ):
            publish(kafka, pop.messages)
            if case == "raw-consume":
                took = raw_consume(kafka, n)
                ceiling = n / took
                print(f"{case:12} {ceiling:>9,.0f} msg/s  (ceiling)")
                continue
            backend, routers = case.split("-")
            with scratch_database(backend, Path(tmp) / "router.db") as url:
                rate, wall, figures = run_routers(kafka, url, int(routers), pop, Path(tmp))
            batches = figures["switchboard_router_lock_seconds_count"] or 1
            print(
                f"{case:12} {rate:>9,.0f} msg/s  = {rate / ceiling:.1%} of raw consume"
                f"  ({n} records in {wall:.1f}s with start-up, join and first poll)\n"
                f"{'':12} {figures['switchboard_router_sql_statements_total'] / n:.3f} "
                f"statements/record, {int(batches)} batches, locks "
                f"{figures['switchboard_router_lock_seconds_sum'] / batches * 1000:.1f} ms/batch, "
                f"{int(figures['switchboard_router_batch_restarts_total'])} restarts, "
                f"RSS {figures['process_resident_memory_bytes'] / 2**20 / int(routers):.0f} MB"
                " per router at the end"
            )


if __name__ == "__main__":
    main()
