"""`switchboard events tail`: the events as they pass, one line each, for people.

A plain consumer without a group (it commits nothing and disturbs no one),
assigned every partition of the chosen topics, starting at the end, the
beginning, or the first offset at or after a time. Records are read with the
archive's row reader, so a record that is not a valid event still prints (with
what is wrong) instead of stopping the tail.

Following `switchboard run`'s embedded broker (found through the data dir), the
tail moves to the broker of a new `run` when the data dir names another one, and
reads that new log from its start: it followed the stopped broker's port for
good, logging connection errors, and never showed an event again.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from normalize.schema import ContactEventKind
from sinks.archive_rows import to_row
from switchboard.events import (
    TYPE_CONVERSATION_STATUS,
    TYPE_DEADLETTER,
    TYPE_DUPLICATE,
    TYPE_INBOUND,
    TYPE_ROUTED,
    contact_event_type,
)
from switchboard.settings import MIN_POLL_TIMEOUT_MS, KafkaSettings
from switchboard.topics import ALL_TOPICS

_SINCE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
#: Short names accepted by ``--topic``.
SHORT_TOPICS = {t.split(".")[1]: t for t in ALL_TOPICS}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``10m``, ``2h``, ``1d``, ``30s``, or an ISO 8601 time (UTC if no zone)."""
    match = _SINCE.match(text.strip())
    now = now or datetime.now(UTC)
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"--since {text!r}: use 10m, 2h, 1d or an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


#: Every event type, by its full name.
EVENT_TYPES = (
    TYPE_INBOUND,
    TYPE_ROUTED,
    TYPE_DUPLICATE,
    TYPE_CONVERSATION_STATUS,
    TYPE_DEADLETTER,
    *(contact_event_type(kind) for kind in ContactEventKind),
)


def _short(kind: str) -> str:
    return kind.removeprefix("io.switchboard.").removesuffix(".v1")


def type_names(names: Sequence[str] | None) -> tuple[str, ...]:
    """``--type`` values, each a full or short event type; ValueError names the known
    ones (``--type merged`` matched nothing, silently)."""
    for name in names or ():
        if name not in EVENT_TYPES and name not in {_short(t) for t in EVENT_TYPES}:
            known = ", ".join(sorted(_short(t) for t in EVENT_TYPES))
            raise ValueError(f"unknown event type {name!r} (known: {known}, or the full names)")
    return tuple(names or ())


def topic_names(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(ALL_TOPICS)
    chosen = []
    for name in names:
        full = SHORT_TOPICS.get(name, name)
        if full not in ALL_TOPICS:
            known = ", ".join(sorted(SHORT_TOPICS))
            raise ValueError(f"unknown topic {name!r} (known: {known}, or the full names)")
        chosen.append(full)
    return chosen


@dataclass(frozen=True)
class Filter:
    types: tuple[str, ...] = ()
    contact: str | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        if self.types:
            kind = str(row.get("type") or "")
            if not any(t in (kind, _short(kind)) for t in self.types):
                return False
        if self.contact is not None:
            mentioned = {row.get("key"), row.get("contact_id"), row.get("other_contact_id")}
            if self.contact not in mentioned and self.contact not in str(row.get("data") or ""):
                return False
        return True


def render(row: dict[str, Any]) -> str:
    """One readable line: when, where, what, and the few fields that say most."""
    when = row.get("time") or row.get("kafka_timestamp")
    stamp = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"
    kind = str(row.get("type") or "?").removeprefix("io.switchboard.").removesuffix(".v1")
    where = f"{row['topic'].split('.')[1]}/{row['partition']}@{row['offset']}"
    fields = [
        f"{name}={row[name]}"
        for name in (
            "channel",
            "sender_kind",
            "contact_id",
            "conversation_id",
            "owner",
            "reason",
            "other_contact_id",
            "status",
            "by",
            "stage",
        )
        if row.get(name) is not None
    ]
    if row.get("kind") in ("contact.merged", "contact.unmerged"):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            merged = json.loads(row["data"]).get("merged_contact_ids")
            if merged:
                fields.append(f"merged={','.join(map(str, merged))}")
    if row.get("archive_error"):
        fields.append(f"error={row['archive_error']!r}")
    return f"{stamp} {where} {kind} {' '.join(fields)}".rstrip()


def as_json(row: dict[str, Any]) -> str:
    """The row as one JSON line; the event itself as an object under ``data``."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name == "raw":
            continue
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    if isinstance(out.get("data"), str):
        with contextlib.suppress(ValueError):
            out["data"] = json.loads(out["data"])
    return json.dumps(out, ensure_ascii=False)


def tail(
    kafka: KafkaSettings,
    topics: Sequence[str],
    *,
    start: str | datetime = "end",
    keep: Filter | None = None,
    limit: int | None = None,
    idle_exit_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    follow: Callable[[], str | None] | None = None,
    notice: Callable[[str], None] = lambda _: None,
) -> Iterator[dict[str, Any]]:
    """Rows of the matching records, in arrival order per partition, until ``stop``,
    ``limit`` rows, or ``idle_exit_s`` seconds without a record.

    ``follow`` (the embedded broker's address, read again from the data dir): while
    no record comes, asked every ``FOLLOW_EVERY_S``; a new address is a new broker,
    whose log is read from its start (``notice`` says so)."""
    keep = keep or Filter()
    bootstrap = kafka.bootstrap
    consumer = _consumer(kafka, bootstrap)
    try:
        _assign(consumer, topics, start)
        shown = 0
        last = checked = time.monotonic()
        while not stop():
            polled = consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS)
            records = sorted(
                (r for batch in polled.values() for r in batch),
                key=lambda r: (r.timestamp, r.topic, r.partition, r.offset),
            )
            now = time.monotonic()
            if records:
                last = now
            elif idle_exit_s is not None and now - last >= idle_exit_s:
                return
            elif follow is not None and now - checked >= FOLLOW_EVERY_S:
                checked = now
                moved = follow()
                if moved and moved != bootstrap:
                    try:
                        fresh = _consumer(kafka, moved)
                    except Exception as exc:  # noqa: BLE001 - not up yet: asked again
                        notice(f"a new broker is named at {moved}, not answering yet: {exc}")
                        continue
                    consumer.close()
                    consumer, bootstrap = fresh, moved
                    _assign(consumer, topics, "beginning")
                    notice(
                        f"a new broker at {moved} (a new switchboard run): its log from the start"
                    )
            for record in records:
                row = to_row(record)
                if keep.matches(row):
                    yield row
                    shown += 1
                    if limit is not None and shown >= limit:
                        return
    finally:
        consumer.close()


#: How often a tail that follows the data dir's broker looks for a new one.
FOLLOW_EVERY_S = 2.0


def _consumer(kafka: KafkaSettings, bootstrap: str | None) -> KafkaConsumer:
    settings = kafka.model_copy(update={"bootstrap": bootstrap})
    return KafkaConsumer(
        client_id=f"{kafka.client_id}-tail",
        enable_auto_commit=False,
        **settings.client_config(),
    )


def _assign(consumer: KafkaConsumer, topics: Sequence[str], start: str | datetime) -> None:
    partitions = [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]
    consumer.assign(partitions)
    _seek(consumer, partitions, start)


def _seek(consumer: KafkaConsumer, partitions: list[TopicPartition], start: str | datetime) -> None:
    if not partitions:
        return
    if start == "beginning":
        consumer.seek_to_beginning(*partitions)
    elif isinstance(start, datetime):
        millis = int(start.timestamp() * 1000)
        found = consumer.offsets_for_times(dict.fromkeys(partitions, millis))
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            hit = found.get(tp)
            consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    else:
        consumer.seek_to_end(*partitions)
