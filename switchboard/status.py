"""`switchboard status`: what an on-call engineer asks first, read from the sources.

It needs no running Switchboard process: consumer lag comes from Kafka (the
groups' committed offsets against the partitions' end offsets), spool depth from
the spool files, mailbox state and counts from the databases. Every part that
cannot be read says why instead of failing the whole report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from sqlalchemy import Engine, func, make_url, select

from ingest.imap import ImapAdapter
from ingest.imap_state import ImapStateStore
from ingest.journal import read_journal_depth
from ingest.spool import read_depth
from router.service import GROUP as ROUTER_GROUP
from router.store import figures as router_figures
from sinks.archive_buffer import read_buffer_depth
from sinks.archive_state import read_archive_state
from sinks.queue import GROUP as QUEUE_GROUP
from sinks.queue import q_conversations
from switchboard.broker import BROKER_FILE
from switchboard.db import make_engine
from switchboard.recovery import read_recovery
from switchboard.settings import Settings
from switchboard.topics import ALL_TOPICS, CONTACTS, INBOUND, ROUTED

Report = dict[str, Any]


def bootstrap_of(settings: Settings) -> str | None:
    if settings.kafka.bootstrap:
        return settings.kafka.bootstrap
    return embedded_bootstrap(settings.data_dir)


def embedded_bootstrap(data_dir: Path) -> str | None:
    """The address of the embedded broker `switchboard run` keeps in ``data_dir``."""
    with contextlib.suppress(OSError):
        return (data_dir / BROKER_FILE).read_text().strip() or None
    return None


def _part(fn: Callable[[], Any]) -> Any:  # noqa: ANN401 - JSON-ready data
    try:
        return fn()
    except NoDatabase as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


#: Why a lag is not a number: the group committed past the end of the log. Seen
#: when the embedded (in-memory) broker restarted under a running group, or a
#: topic was deleted and re-created; a negative "lag" would read as "ahead".
LAG_UNKNOWN = "unknown (committed offset ahead of the log: the broker lost data?)"


def _committed(committed: dict[TopicPartition, Any], tp: TopicPartition) -> int:
    found = committed.get(tp)
    offset = getattr(found, "offset", -1) if found is not None else -1
    return max(0, int(offset))  # -1: nothing committed yet


def partition_lag(end: int, committed: int) -> int | None:
    """Messages the group has yet to read; None when its offset is past the log's end."""
    return None if committed > end else end - committed


def group_lag(partitions: dict[str, int | None]) -> int | None:
    """The group's total, unknown as soon as one partition's is."""
    lags = list(partitions.values())
    return None if any(lag is None for lag in lags) else sum(lag or 0 for lag in lags)


def format_lag(lag: int | None) -> str:
    return LAG_UNKNOWN if lag is None else str(lag)


def log_ends(
    consumer: KafkaConsumer, reported: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The partitions' real end offsets. The embedded broker (Tansu 0.6, memory
    storage) answers "latest" with the last record *batch*'s base offset + 1: after
    one batch of 500 records it says 1, and a group that read all 500 looked 499
    ahead (the negative lags). The last batch, fetched from there, says where the
    log really ends; on Kafka that fetch returns nothing and the answer stands."""
    ends = dict(reported)
    wanted = {tp: end - 1 for tp, end in reported.items() if end > 0}
    if not wanted:
        return ends
    consumer.assign(list(wanted))
    for tp, offset in wanted.items():
        consumer.seek(tp, offset)
    deadline, seen = time.monotonic() + 3.0, False
    while time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=500)
        if not polled and seen:
            break  # a batch larger than one poll comes in several
        for tp, records in polled.items():
            seen = True
            ends[tp] = max(ends[tp], max(r.offset for r in records) + 1)
    return ends


def _group(
    consumer: KafkaConsumer,
    admin: KafkaAdminClient,
    group: str,
    topics: list[str],
    settings: Settings,
) -> Report | None:
    """One group's lag by partition; None for an archive group nothing committed."""
    tps = [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]
    committed = admin.list_group_offsets({group: tps}).get(group, {})
    if group == settings.archive.group_id and not any(
        getattr(committed.get(tp), "offset", -1) >= 0 for tp in tps
    ):
        return None  # no archive has committed on this broker
    ends = log_ends(consumer, consumer.end_offsets(tps))
    lag = {
        f"{tp.topic}/{tp.partition}": partition_lag(ends[tp], _committed(committed, tp))
        for tp in tps
    }
    found: Report = {"lag": group_lag(lag), "partitions": lag}
    if group == settings.archive.group_id:
        found["archive"] = True  # its lag: events not in a file yet
    return found


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
        for group, topics in (
            (ROUTER_GROUP, [INBOUND]),
            (QUEUE_GROUP, [ROUTED, CONTACTS]),
            (settings.archive.group_id, list(ALL_TOPICS)),
        ):
            # One group's failure is that group's line, tried once more first: an end
            # offset kafka-python could not place (a KeyError for a partition whose
            # leader it did not know yet, seen right after a consumer died) made the
            # whole report "kafka: unavailable" and hid the router's lag (operator
            # review, 2026-12-01).
            for attempt in (1, 2):
                try:
                    found = _group(consumer, admin, group, topics, settings)
                    break
                except Exception as exc:  # noqa: BLE001 - reported on the group's line
                    found = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    if attempt == 1:
                        time.sleep(0.5)
            if found is not None:
                groups[group] = found
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


def _journal(settings: Settings) -> Report | None:
    """The embedded broker's journal (none with an external Kafka) and the last recovery."""
    directory = settings.spool_dir()
    depths = [
        (path, depth)
        for path in (sorted(directory.glob("*.sqlite3")) if directory.is_dir() else [])
        if (depth := read_journal_depth(path)) is not None
    ]
    recovery = read_recovery(settings.data_dir)
    if not depths and recovery is None:
        return None
    return {
        "messages": sum(d.messages - d.dead_letters for _, d in depths),
        "dead_letters": sum(d.dead_letters for _, d in depths),
        "bytes": sum(d.bytes for _, d in depths),
        "last_recovery": recovery,
    }


def _render_journal(journal: Report | None) -> list[str]:
    if journal is None:
        return []
    if "error" in journal:
        return [f"journal: unreadable ({journal['error']})"]
    line = f"journal: {journal['messages']} messages, {journal['bytes']} bytes not yet in the queue"
    if journal.get("dead_letters"):
        line += f"; {journal['dead_letters']} dead letters not yet archived (in those bytes)"
    lines = [line]
    last = journal["last_recovery"]
    if last:
        lines.append(
            f"  last recovery {last['at']}: the embedded broker lost its memory ({last['cause']}); "
            f"{last['replayed_messages']} messages replayed from the journal, "
            f"{last['replayed_events']} routed events from the outbox "
            f"({last['recoveries']} recoveries, {last['replayed_messages_total']} messages in all)"
        )
    return lines


def _router(engine: Engine) -> Report:
    with engine.connect() as c:
        found = router_figures(c)
    return {
        "contacts": found["contacts"],
        "messages": found["messages"],
        "events_not_yet_published": found["pending_events"],
    }


class NoDatabase(Exception):
    """A SQLite file that is not there: `status` reads, it never creates one."""


def _existing(url: str) -> str:
    """``url``, unless it names a SQLite file that does not exist: status run with
    another data dir than `switchboard run` created an empty database in the
    working directory and printed SQL errors about missing tables (newcomer review,
    2026-12-02)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.is_file():
            raise NoDatabase(
                f"no database at {path} (is SWITCHBOARD_DATA_DIR the one `switchboard run` uses?)"
            )
    return url


def _queue(settings: Settings) -> Report:
    engine = make_engine(_existing(settings.resolved_queue_database_url()))
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
    try:
        engine: Engine | None = make_engine(_existing(settings.resolved_database_url()))
        missing: Report | None = None
    except NoDatabase as exc:
        engine, missing = None, {"error": str(exc)}

    def on_router_db(read: Callable[[Engine], Any]) -> Any:  # noqa: ANN401 - JSON-ready
        return missing if engine is None else _part(lambda: read(engine))

    try:
        return {
            "kafka": _part(lambda: _kafka(settings)),
            "spool": _part(lambda: _spools(settings)),
            "journal": _part(lambda: _journal(settings)),
            "archive": _part(lambda: _archive(settings)),
            "router": on_router_db(_router),
            "queue": _part(lambda: _queue(settings)),
            "imap": on_router_db(lambda e: ImapStateStore(e).status())
            if ImapAdapter.settings_from(settings).mailboxes
            else [],
        }
    finally:
        if engine is not None:
            engine.dispose()


def _archive(settings: Settings) -> Report | None:
    """The archive sink's report and, on the embedded broker, its rows on disk."""
    state = read_archive_state(settings.data_dir)
    buffered = read_buffer_depth(settings.data_dir)
    if state is None or buffered is None:
        return state
    return {**state, "buffered_rows": buffered}


def _render_archive(state: Report | None) -> list[str]:
    """The archive sink's own report (this host's data dir), when it ran here."""
    if state is None:
        return []
    if "error" in state:
        return [f"archive: unreadable ({state['error']})"]
    last = (
        f"last file {state['last_file_at']} ({state['last_file']})"
        if state.get("last_file")
        else f"no file written since {state.get('started_at')}"
    )
    if state.get("failing_since"):
        line = (
            f"archive: FAILING since {state['failing_since']}, {state['failures']} failed "
            f"writes, the last: {state['last_error']}; {last}"
        )
    else:
        line = f"archive: {last}, {state['files']} files since {state.get('started_at')}"
    # While the archive fails is when the rows held on disk matter most: what a
    # repaired archive will write, and what the disk is filling with.
    if state.get("buffered_rows"):
        line += f"; {state['buffered_rows']} rows buffered on disk, not in a file yet"
    return [line]


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
            if "error" in info:
                lines.append(f"  {group}: lag not read ({info['error']})")
                continue
            line = f"  {group}: lag {format_lag(info['lag'])}"
            if info.get("archive"):
                line += " (events not in a file yet: a file rolls every roll_s)"
            lines.append(line)
    lines += _render_spool(report["spool"])
    lines += _render_journal(report.get("journal"))
    lines += _render_archive(report.get("archive"))
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
