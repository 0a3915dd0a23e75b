"""`switchboard status`: what an on-call engineer asks first, read from the sources.

It needs no running Switchboard process: consumer lag comes from Kafka (the
groups' committed offsets against the partitions' end offsets), spool depth from
the spool files, mailbox state and counts from the databases. Every part that
cannot be read says why instead of failing the whole report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from sqlalchemy import Engine, func, select

from ingest.imap_state import ImapStateStore
from ingest.spool import read_depth
from router.service import GROUP as ROUTER_GROUP
from router.store import contacts, messages, outbox
from sinks.queue import GROUP as QUEUE_GROUP
from sinks.queue import q_conversations
from switchboard.db import make_engine
from switchboard.settings import Settings
from switchboard.topics import CONTACTS, INBOUND, ROUTED

#: Where `switchboard run` writes the embedded broker's address for this command.
BROKER_FILE = "embedded-broker"

Report = dict[str, Any]


def bootstrap_of(settings: Settings) -> str | None:
    if settings.kafka.bootstrap:
        return settings.kafka.bootstrap
    with contextlib.suppress(OSError):
        return (settings.data_dir / BROKER_FILE).read_text().strip() or None
    return None


def _part(fn: Callable[[], Any]) -> Any:  # noqa: ANN401 - JSON-ready data
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _committed(committed: dict[TopicPartition, Any], tp: TopicPartition) -> int:
    found = committed.get(tp)
    offset = getattr(found, "offset", -1) if found is not None else -1
    return max(0, int(offset))  # -1: nothing committed yet


def _kafka(settings: Settings) -> Report:
    bootstrap = bootstrap_of(settings)
    if bootstrap is None:
        return {"error": "no broker configured and no embedded broker running"}
    config = settings.kafka.model_copy(update={"bootstrap": bootstrap}).client_config()
    # Bounded: a broker that is away must not hold the whole report for 30 s.
    consumer = KafkaConsumer(**config, bootstrap_timeout_ms=3000)
    admin = KafkaAdminClient(**config, bootstrap_timeout_ms=3000)
    try:
        groups: Report = {}
        for group, topics in ((ROUTER_GROUP, [INBOUND]), (QUEUE_GROUP, [ROUTED, CONTACTS])):
            tps = [
                TopicPartition(t, p)
                for t in topics
                for p in sorted(consumer.partitions_for_topic(t) or ())
            ]
            ends = consumer.end_offsets(tps)
            committed = admin.list_group_offsets({group: tps}).get(group, {})
            lag = {f"{tp.topic}/{tp.partition}": ends[tp] - _committed(committed, tp) for tp in tps}
            groups[group] = {"lag": sum(lag.values()), "partitions": lag}
        return {"bootstrap": bootstrap, "groups": groups}
    finally:
        consumer.close()
        admin.close()


def _spools(settings: Settings) -> list[Report]:
    directory = settings.spool_dir()
    files = sorted(directory.glob("*.sqlite3")) if directory.is_dir() else []
    out = []
    for path in files:
        depth = read_depth(path)
        out.append(
            {
                "file": str(path),
                "messages": depth.messages,
                "bytes": depth.bytes,
                "oldest_age_s": None
                if depth.oldest_age_s is None
                else round(depth.oldest_age_s, 1),
            }
        )
    return out


def _router(engine: Engine) -> Report:
    with engine.connect() as c:
        return {
            "contacts": c.scalar(
                select(func.count()).select_from(contacts).where(contacts.c.merged_into.is_(None))
            ),
            "messages": c.scalar(select(func.count()).select_from(messages)),
            "events_not_yet_published": c.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.pending.is_(True))
            ),
        }


def _queue(settings: Settings) -> Report:
    engine = make_engine(settings.resolved_queue_database_url())
    try:
        with engine.connect() as c:
            rows = c.execute(
                select(q_conversations.c.owner, q_conversations.c.status, func.count())
                .group_by(q_conversations.c.owner, q_conversations.c.status)
                .order_by(q_conversations.c.owner)
            ).all()
    finally:
        engine.dispose()
    owners: dict[str, dict[str, int]] = {}
    for owner, status, count in rows:
        owners.setdefault(owner, {})[status] = count
    return {"owners": owners}


def collect(settings: Settings) -> Report:
    """Everything `switchboard status` prints, as JSON-ready data."""
    # One engine for the router's tables and the mailbox state (the same database).
    engine = make_engine(settings.resolved_database_url())
    try:
        return {
            "kafka": _part(lambda: _kafka(settings)),
            "spool": _part(lambda: _spools(settings)),
            "router": _part(lambda: _router(engine)),
            "queue": _part(lambda: _queue(settings)),
            "imap": _part(lambda: ImapStateStore(engine).status())
            if settings.imap.mailboxes
            else [],
        }
    finally:
        engine.dispose()


def _render_spool(spool: list[Report] | Report) -> list[str]:
    if isinstance(spool, dict):
        return [f"spool: unreadable ({spool['error']})"]
    if not spool:
        return ["spool: none"]
    lines = []
    for s in spool:
        age = "" if s["oldest_age_s"] is None else f", oldest {s['oldest_age_s']} s"
        lines.append(
            f"spool {Path(s['file']).name}: {s['messages']} messages, {s['bytes']} bytes{age}"
        )
    return lines


def render(report: Report) -> str:
    """The human summary."""
    lines: list[str] = []
    kafka = report["kafka"]
    if "error" in kafka:
        lines.append(f"kafka: unavailable ({kafka['error']})")
    else:
        lines.append(f"kafka: {kafka['bootstrap']}")
        for group, info in kafka["groups"].items():
            lines.append(f"  {group}: lag {info['lag']}")
    lines += _render_spool(report["spool"])
    router = report["router"]
    if "error" in router:
        lines.append(f"router: unavailable ({router['error']})")
    else:
        lines.append(
            f"router: {router['contacts']} contacts, {router['messages']} messages, "
            f"{router['events_not_yet_published']} events not yet published"
        )
    queue = report["queue"]
    if "error" in queue:
        lines.append(f"queue: unavailable ({queue['error']})")
    else:
        lines.append("queue:" if queue["owners"] else "queue: empty")
        for owner, counts in queue["owners"].items():
            parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            lines.append(f"  {owner}: {parts}")
    imap = report["imap"]
    if isinstance(imap, dict):
        lines.append(f"imap: unreadable ({imap['error']})")
    for box in imap if isinstance(imap, list) else []:
        state = "connected" if box["connected"] else "disconnected"
        lines.append(
            f"imap {box['mailbox']}: {state}, last success {box['last_success'] or 'never'}"
        )
    return "\n".join(lines)
