"""Serve the HTTP ingest app with uvicorn on a real socket, in a background loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from kafka import KafkaConsumer, TopicPartition
from pydantic import BaseModel
from sqlalchemy import Engine

from ingest.evidence import EvidenceBudget
from ingest.handoff import HandOff
from ingest.sdk import AdapterContext, HttpAdapter, mount_adapters
from ingest.spool import Spool
from ingest.twilio import TwilioAdapter
from ingest.webhook import WebhookAdapter
from ingest.workers import ParserPool
from switchboard.blobs import FileBlobStore
from switchboard.events import read_data
from switchboard.http import Readiness, create_app
from switchboard.kafka import Publisher, make_consumer
from switchboard.limits import HttpLimitSettings
from switchboard.runtime import HttpServer
from switchboard.settings import (
    MIN_POLL_TIMEOUT_MS,
    KafkaSettings,
    TwilioSettings,
    WebhookSettings,
    WebhooksSettings,
)

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class RunningHttp:
    base: str
    blobs: FileBlobStore
    server: HttpServer


@contextmanager
def http_ingest(
    kafka: KafkaSettings,
    data_dir: Path,
    *,
    twilio: TwilioSettings | None = None,
    hooks: list[WebhookSettings] | None = None,
    public_url: str | None = None,
    spool: Spool | None = None,
    providers: Sequence[tuple[type[HttpAdapter[Any]], Any]] = (),
    on_stop: Callable[[str], None] | None = None,
    evidence: EvidenceBudget | None = None,
    limits: HttpLimitSettings | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    parse_timeout_s: float = 30.0,
    engine: Engine | None = None,
) -> Iterator[RunningHttp]:
    """The HTTP ingest app on a real socket: Twilio (if given), the web hooks, and
    ``providers``: (adapter class, its settings) pairs built on the same hand-off.
    Providers that parse mail get a real parse process, as in production; ``engine``
    is the process database the adapters get (none by default)."""
    publisher = Publisher(kafka)
    blobs = FileBlobStore(data_dir / "blobs")
    handoff = HandOff(publisher, blobs, spool=spool, spool_after_s=1.0, evidence=evidence)
    app = create_app(Readiness(), limits)
    parsers = ParserPool(1, parse_timeout_s) if any(c.offload for c, _ in providers) else None
    context = AdapterContext(handoff, public_url=public_url, engine=engine, parsers=parsers)
    if on_stop is not None:  # the default stops this process, as it does in production
        context = replace(context, on_stop=on_stop)
    adapters: list[HttpAdapter[Any]] = [
        WebhookAdapter(WebhooksSettings(hooks=hooks or []), context)
    ]
    if twilio is not None:
        adapters.insert(0, TwilioAdapter(twilio, context))
    adapters += [cls(settings, context) for cls, settings in providers]
    mount_adapters(app, adapters)
    server = HttpServer(app, "127.0.0.1", 0, limits=limits)
    loop = loop_factory()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="http-test-loop")
    thread.start()
    if parsers is not None:
        asyncio.run_coroutine_threadsafe(parsers.start(), loop).result(60)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield RunningHttp(f"http://127.0.0.1:{server.port}", blobs, server)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        if parsers is not None:
            asyncio.run_coroutine_threadsafe(parsers.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        handoff.close()
        publisher.close(timeout_s=2)


def find(
    kafka: KafkaSettings,
    group: str,
    topic: str,
    model: type[ModelT],
    match: Callable[[ModelT], bool],
    *,
    count: int = 1,
    timeout_s: float = 20,
) -> list[ModelT]:
    """Events of ``model`` on ``topic`` for which ``match`` holds (waits for ``count``)."""
    found: list[ModelT] = []
    consumer = make_consumer(kafka, group_id=group, topics=[topic])
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=MIN_POLL_TIMEOUT_MS).values():
                for record in batch:
                    item = read_data(record.value, model)
                    if match(item):
                        found.append(item)
    finally:
        consumer.close()
    return found


def find_until_end(
    kafka: KafkaSettings, topic: str, model: type[ModelT], match: Callable[[ModelT], bool]
) -> list[ModelT]:
    """Events of ``model`` on ``topic`` for which ``match`` holds, read from the
    beginning up to the end offsets as they are now: proof that something is
    absent once whatever could have written it has answered, without waiting."""
    consumer = KafkaConsumer(
        enable_auto_commit=False, auto_offset_reset="earliest", **kafka.client_config()
    )
    found: list[ModelT] = []
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end offsets")
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    if record.offset < ends[TopicPartition(record.topic, record.partition)]:
                        item = read_data(record.value, model)
                        if match(item):
                            found.append(item)
    finally:
        consumer.close()
    return found
