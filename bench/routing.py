"""Router throughput against its ceiling, the raw kafka-python consume rate.

Usage: PYTHONPATH=. .venv/bin/python bench/routing.py [--people N] [--per-person K]
       [--only sqlite-1,postgres-1,postgres-2]

Publishes one population of messages (people writing from 2-3 identities, one
linking form each, 10% second arrivals, 2% re-published events: the mix of the
concurrency test) to a fresh embedded broker with 4 inbound partitions, then:

  raw-consume   a kafka-python consumer group reading the same records, no work
  sqlite-1      one `switchboard router` process on a SQLite file
  postgres-1    one router on PostgreSQL (127.0.0.1:5432, database `test`, own schema)
  postgres-2    two routers on PostgreSQL in one consumer group

A router's rate is arrivals routed divided by the time between the first and
the last event it recorded (process start-up and the group join excluded);
the wall time including both is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer
from sqlalchemy import Engine, func, select, text

from router.store import outbox
from switchboard.db import make_engine, upgrade
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests.router_helpers import Population, fresh_kafka, population, publish

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
        max_poll_records=500,
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


def run_routers(
    kafka: KafkaSettings, url: str, routers: int, pop: Population, root: Path
) -> tuple[float, float]:
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
    }
    started = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-m", "switchboard.cli", "router"], env=env)
        for _ in range(routers)
    ]
    try:
        target = len(pop.ids)
        while _done(engine) < target:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a router exited")
            time.sleep(0.2)
        wall = time.perf_counter() - started
        return _span(engine), wall
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--people", type=int, default=2500)
    parser.add_argument("--per-person", type=int, default=8)
    parser.add_argument("--only", default="sqlite-1,postgres-1,postgres-2")
    args = parser.parse_args()
    pop = population(args.people, args.per_person, seed=3)
    n = len(pop.messages)
    print(
        f"{n} records ({len(pop.ids)} arrivals, {len(pop.dedupe_keys)} messages) "
        f"from {args.people} people"
    )
    ceiling = 0.0
    for case in ["raw-consume", *args.only.split(",")]:
        with fresh_kafka(partitions=4) as kafka, tempfile.TemporaryDirectory() as tmp:
            publish(kafka, pop.messages)
            if case == "raw-consume":
                took = raw_consume(kafka, n)
                ceiling = n / took
                print(f"{case:12} {ceiling:>9,.0f} msg/s  (ceiling)")
                continue
            backend, routers = case.split("-")
            schema = None
            if backend == "sqlite":
                url = f"sqlite:///{tmp}/router.db"
            else:
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                admin = make_engine(POSTGRES)
                with admin.begin() as c:
                    c.execute(text(f'CREATE SCHEMA "{schema}"'))
                url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
            try:
                span, wall = run_routers(kafka, url, int(routers), pop, Path(tmp))
            finally:
                if schema:
                    with admin.begin() as c:
                        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                    admin.dispose()
            rate = n / span
            print(
                f"{case:12} {rate:>9,.0f} msg/s  = {rate / ceiling:.1%} of raw consume"
                f"  ({n} in {span:.1f}s; {wall:.1f}s with start-up and join)"
            )


if __name__ == "__main__":
    main()
