"""Several `switchboard router` processes on one PostgreSQL: races, merges, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import Engine, func, select

from normalize.schema import ContactEvent, MessageRouted
from router.tables import merges
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.events import TYPE_ROUTED, read_data
from switchboard.settings import KafkaSettings
from switchboard.topics import ROUTED
from tests.router_helpers import (
    CONFIG,
    Population,
    Snapshot,
    check_population,
    events_of,
    fresh_kafka,
    population,
    processed,
    publish,
    snapshot,
    store_for,
)

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENTS = CONFIG.teams["support"].agents
TOML = """
[router]
blocked_identities = ["support@example.com", "+14155550199"]

[[teams]]
name = "support"
agents = ["alice", "bob", "carol"]
"""


class Routers:
    """`switchboard router` subprocesses sharing one group, database and broker."""

    def __init__(self, kafka: KafkaSettings, database_url: str, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "switchboard.toml").write_text(TOML)
        self.root = root
        self.env = {
            **os.environ,
            "SWITCHBOARD_DATABASE_URL": database_url,
            "SWITCHBOARD_KAFKA_BOOTSTRAP": kafka.bootstrap or "",
            "SWITCHBOARD_HTTP_PORT": "0",
            "SWITCHBOARD_CONFIG": str(root / "switchboard.toml"),
            "SWITCHBOARD_LOG_FORMAT": "json",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.started += 1
        data = self.root / f"router-{self.started}"
        data.mkdir()
        log = (self.root / f"router-{self.started}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "router"],
            env={**self.env, "SWITCHBOARD_DATA_DIR": str(data)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def errors(self) -> list[str]:
        """Our own error lines (kafka-python logs a cancelled metadata refresh at exit)."""
        found = []
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") == "error" and not entry.get("logger", "").startswith("kafka"):
                found.append(line)
        return found

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_all(engine: Engine, pop: Population, routers: Routers, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if pop.ids <= processed(engine):
            return time.monotonic() - started
        time.sleep(0.25)
    missing = len(pop.ids - processed(engine))
    raise AssertionError(f"{missing} messages not routed; logs:\n{routers.logs()[-4000:]}")


def test_four_routers_racing_on_shared_people_give_one_contact_each(
    migrated_postgres: Engine, postgres_schema_url: str, tmp_path: Path
) -> None:
    pop = population(300, seed=11)
    with fresh_kafka(partitions=8) as kafka:
        routers = Routers(kafka, postgres_schema_url, tmp_path)
        try:
            for _ in range(4):
                routers.start()
            publish(kafka, pop.messages)
            took = wait_all(migrated_postgres, pop, routers, timeout_s=240)
        finally:
            routers.stop()
    logs = routers.logs()
    assert "deadlock detected" not in logs
    assert routers.errors() == []
    check_population(snapshot(migrated_postgres), pop, AGENTS)
    merges = logs.count('"msg": "contacts merged"')
    assert merges > 0  # the race this test is about did happen
    print(  # noqa: T201 - the figures are useful in the test log
        f"4 routers: {len(pop.messages)} messages from {len(pop.people)} people in {took:.1f}s, "
        f"{merges} merges, {logs.count('batch will be retried')} batch retries"
    )


def test_routers_killed_with_sigkill_mid_batch_end_in_the_same_state(
    migrated_postgres: Engine, postgres_schema_url: str, tmp_path: Path
) -> None:
    pop = population(150, seed=5)
    with fresh_kafka(partitions=4) as kafka:
        routers = Routers(kafka, postgres_schema_url, tmp_path)
        kills = 0
        try:
            routers.start()
            routers.start()
            half = len(pop.messages) // 2
            publish(kafka, pop.messages[:half])
            # Kill one router every second while messages flow, start a new one.
            deadline = time.monotonic() + 60
            while not pop.ids <= processed(migrated_postgres) and time.monotonic() < deadline:
                time.sleep(1.0)
                victim = next(p for p in reversed(routers.procs) if p.poll() is None)
                victim.send_signal(signal.SIGKILL)
                victim.wait(5)
                kills += 1
                routers.start()
                if kills == 2:
                    publish(kafka, pop.messages[half:])
                if kills >= 6:
                    break
            wait_all(migrated_postgres, pop, routers, timeout_s=180)
        finally:
            routers.stop()
        # Every message's routed event reached Kafka (replays repeat ids, never lose one).
        routed = events_of(
            kafka,
            ROUTED,
            TYPE_ROUTED,
            MessageRouted,
            count=len(pop.dedupe_keys),
            distinct=lambda e: e.event_id,
            timeout_s=60,
        )
        assert {r.message.dedupe_key for r in routed} == pop.dedupe_keys
    assert kills >= 3
    crashed = snapshot(migrated_postgres)
    check_population(crashed, pop, AGENTS)
    # The same messages through one router that never crashes: the same messages,
    # grouped into the same contacts with the same identities. (Ids depend on which
    # message came first. So does the number of conversations of a person whose
    # contacts merged: merged conversations move over as they are, and whether a
    # message preceded the linking form differs between any two runs.)
    reference = _reference_run(pop, tmp_path / "reference")
    assert _grouping(crashed) == _grouping(reference)
    assert {keys for _, keys in crashed.contacts.values()} == {
        keys for _, keys in reference.contacts.values()
    }


def _reference_run(pop: Population, root: Path) -> Snapshot:
    database = root / "reference.db"
    root.mkdir()
    with fresh_kafka(partitions=4) as kafka:
        routers = Routers(kafka, f"sqlite:///{database}", root)
        engine = make_engine(f"sqlite:///{database}")
        try:
            upgrade(engine)
            routers.start()
            publish(kafka, pop.messages)
            wait_all(engine, pop, routers, timeout_s=180)
            return snapshot(engine)
        finally:
            routers.stop()
            engine.dispose()


def _grouping(snap: Snapshot) -> frozenset[frozenset[str]]:
    """Messages (by dedupe key) grouped by contact."""
    by_contact: dict[object, set[str]] = {}
    for contact, _, key in snap.messages.values():
        by_contact.setdefault(contact, set()).add(key)
    return frozenset(frozenset(v) for v in by_contact.values())


def test_agents_merge_and_unmerge_while_four_routers_route(
    migrated_postgres: Engine, postgres_schema_url: str, tmp_path: Path
) -> None:
    """Two agents merge and unmerge pairs of customers again and again while four
    routers route those customers' messages: no deadlock, and in the end every
    person has one contact with all their identities and every message."""
    pop = population(120, seed=23)
    # Every person's linking form first, so each person is one contact before the
    # agents start; the rest arrives while they merge and unmerge.
    forms = [m for m in pop.messages if m.channel == "webhook"]
    rest = [m for m in pop.messages if m.channel != "webhook"]
    first, second = forms + rest[: len(rest) // 3], rest[len(rest) // 3 :]
    store = store_for(migrated_postgres)
    cycles, moved = [0, 0], [0, 0]
    failures: list[BaseException] = []
    with fresh_kafka(partitions=8) as kafka:
        routers = Routers(kafka, postgres_schema_url, tmp_path)
        try:
            for _ in range(4):
                routers.start()
            publish(kafka, first)
            wait_for_ids(migrated_postgres, {m.id for m in first}, routers)
            snap = snapshot(migrated_postgres)
            contact_of = [snap.contact_of(sorted(keys)[0]) for keys in pop.people]
            pairs = [(contact_of[i], contact_of[i + 1]) for i in range(0, 40, 2)]
            done = threading.Event()

            def agent(n: int) -> None:
                try:
                    while not done.is_set():
                        for a, b in pairs[n::2]:
                            assert a is not None
                            assert b is not None
                            store.merge(a, b, by=f"agent-{n}")
                            undone = store.unmerge(a, b, by=f"agent-{n}")
                            cycles[n] += 1
                            data = read_data(undone.value(), ContactEvent)
                            moved[n] += len(data.moved_messages)
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    failures.append(exc)

            agents = [threading.Thread(target=agent, args=(n,)) for n in range(2)]
            for thread in agents:
                thread.start()
            # In slices, so the agents have the time to race many messages.
            began = time.monotonic()
            for start in range(0, len(second), 100):
                publish(kafka, second[start : start + 100])
                time.sleep(0.3)
            wait_all(migrated_postgres, pop, routers, timeout_s=240)
            took = time.monotonic() - began
            done.set()
            for thread in agents:
                thread.join(60)
        finally:
            routers.stop()
    assert failures == []
    logs = routers.logs()
    assert "deadlock detected" not in logs
    assert routers.errors() == []
    final = snapshot(migrated_postgres)
    check_population(final, pop, AGENTS)
    # Every message with the contact of the person who sent it.
    sender_of = {m.id: m.sender.key for m in pop.messages}
    for message_id, (contact, _, _) in final.messages.items():
        assert final.contact_of(sender_of[message_id]) == contact, message_id
    with migrated_postgres.connect() as c:
        undone = c.execute(
            select(func.count()).select_from(merges).where(merges.c.by.is_not(None))
        ).scalar_one()
        open_merges = c.execute(
            select(func.count())
            .select_from(merges)
            .where(merges.c.by.is_not(None), merges.c.undone_at.is_(None))
        ).scalar_one()
    assert open_merges == 0
    assert undone == sum(cycles) > 0
    # The race happened: messages routed into a merged contact went back.
    assert sum(moved) > 0
    print(  # noqa: T201 - the figures are useful in the test log
        f"4 routers, 2 agents: {len(pop.messages)} messages in {took:.1f}s, "
        f"{sum(cycles)} merge+unmerge cycles, {sum(moved)} messages moved back, "
        f"{logs.count('batch will be retried')} batch retries"
    )


def wait_for_ids(engine: Engine, ids: set[UUID], routers: Routers) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ids <= processed(engine):
            return
        time.sleep(0.25)
    raise AssertionError(f"not routed in time; logs:\n{routers.logs()[-4000:]}")
