"""Builds the object graph, in one place, for the CLI.

Nothing in the packages connects to anything at import time; this module wires
settings into the broker, the publisher, the database and the components.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from ingest.handoff import HandOff
from ingest.imap_state import ImapStateStore
from ingest.registry import discover
from ingest.sdk import Adapter, AdapterContext, HttpAdapter, mount_adapters
from ingest.spool import Drainer, Spool
from router.config import routing_config
from router.service import Router
from router.store import RouterStore
from sinks.api import install_denied_handler, queue_router
from sinks.queue import QueueSink, QueueStore
from switchboard.blobs import FileBlobStore
from switchboard.broker import MEMORY_WARNING, EmbeddedBroker
from switchboard.db import make_engine, ping, upgrade
from switchboard.http import Readiness, create_app
from switchboard.kafka import Publisher, probe_broker
from switchboard.runtime import (
    Component,
    HttpServer,
    StartupError,
    install_signal_handlers,
    run_components,
)
from switchboard.settings import Settings
from switchboard.status import BROKER_FILE
from switchboard.topics import ensure_topics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def kafka_available(settings: Settings) -> Iterator[EmbeddedBroker | None]:
    """Yield with ``settings.kafka.bootstrap`` set: configured, or an embedded broker."""
    if settings.kafka.bootstrap:
        yield None
        return
    broker = EmbeddedBroker(log_path=settings.data_dir / "tansu.log")
    broker.start()
    settings.kafka.bootstrap = broker.bootstrap
    # `switchboard status` in another shell finds the embedded broker here.
    address_file = settings.data_dir / BROKER_FILE
    address_file.write_text(broker.bootstrap + "\n")
    log.warning(MEMORY_WARNING, extra={"bootstrap": broker.bootstrap})
    print(f"WARNING: {MEMORY_WARNING}", file=sys.stderr, flush=True)  # noqa: T201 - for humans
    try:
        yield broker
    finally:
        address_file.unlink(missing_ok=True)
        broker.stop()
        settings.kafka.bootstrap = None


@dataclass
class Pipeline:
    """Everything `switchboard run` holds: shared clients and the components."""

    settings: Settings
    publisher: Publisher
    engine: Engine
    readiness: Readiness
    components: list[Component] = field(default_factory=list)
    handoff: HandOff | None = None
    router_engine: Engine | None = None
    queue_engine: Engine | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
            if self.handoff.spool is not None:
                self.handoff.spool.close()
        self.publisher.close(timeout_s=2.0)
        self.engine.dispose()
        if self.router_engine is not None:
            self.router_engine.dispose()
        if self.queue_engine is not None:
            self.queue_engine.dispose()


ROLES = frozenset({"http", "smtp", "imap", "router", "queue"})
INGEST_ROLES = frozenset({"http", "smtp", "imap"})


def router_store(settings: Settings, engine: Engine | None = None) -> RouterStore:
    """The router's directory over its own engine (SQLite: writers BEGIN IMMEDIATE)."""
    return RouterStore(
        engine or make_engine(settings.resolved_database_url(), sqlite_immediate=True),
        routing_config(settings),
        retention=timedelta(days=settings.router.dedupe_retention_days),
    )


def _readiness(settings: Settings, engine: Engine, started: threading.Event) -> Readiness:
    readiness = Readiness()
    readiness.add("kafka", lambda: probe_broker(settings.kafka))
    readiness.add("database", lambda: ping(engine))

    def all_started() -> None:
        # The HTTP server starts first (it serves /healthz meanwhile); ready means
        # every component (SMTP, pollers, router, sinks) is serving.
        if not started.is_set():
            raise RuntimeError("components are still starting")

    readiness.add("components", all_started)
    return readiness


def make_spool(settings: Settings, roles: frozenset[str]) -> Spool | None:
    """The spool of a process running ingest roles (none if disabled or not ingest)."""
    ingest_roles = sorted(roles & INGEST_ROLES)
    if not ingest_roles or not settings.spool.enabled:
        return None
    # One spool file per process kind: its drainer owns (deletes) what it holds.
    return Spool(
        settings.spool_dir() / f"{'-'.join(ingest_roles)}.sqlite3",
        max_bytes=settings.spool.max_bytes,
        max_messages=settings.spool.max_messages,
    )


def build_adapters(
    settings: Settings, roles: frozenset[str], context: AdapterContext
) -> list[Adapter[Any]]:
    """Every installed adapter the configuration enables, for the roles this
    process runs. A broken adapter the configuration enables stops the start;
    one it does not enable is only logged."""
    adapters: list[Adapter[Any]] = []
    for name, info in discover().items():
        if info.error is not None:
            if name in settings.adapters:
                raise StartupError(f"adapter {name!r} is enabled but broken: {info.error}")
            log.warning("adapter %s is installed but broken: %s", name, info.error)
            continue
        cls = info.adapter
        if cls.role not in roles or not cls.enabled_in(settings):
            continue
        try:
            adapter = cls.build(settings, context)
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError(f"adapter {name!r} could not be built: {exc}") from exc
        adapters.append(adapter)
        log.info("adapter enabled", extra={"adapter": name, "role": cls.role})
    return adapters


def build_pipeline(
    settings: Settings, roles: frozenset[str] = ROLES, *, rebuild_queue: bool = False
) -> Pipeline:
    """Wire the shared clients and the components of the given roles."""
    kafka = settings.kafka

    def recreate_topics() -> None:
        # An in-memory broker that restarted has lost its topics; a real cluster
        # has them already, and then this is a cheap no-op.
        try:
            ensure_topics(kafka, wait_s=2.0)
        except Exception as exc:  # noqa: BLE001 - best effort; the publish reports the failure
            log.warning("could not re-check topics", extra={"error": repr(exc)})

    publisher = Publisher(kafka, on_new_producer=recreate_topics)
    engine = make_engine(settings.resolved_database_url())
    started = threading.Event()
    readiness = _readiness(settings, engine, started)
    app = create_app(readiness)
    blobs = FileBlobStore(settings.data_dir / "blobs")
    spool = make_spool(settings, roles)
    handoff = HandOff(publisher, blobs, spool=spool, spool_after_s=settings.spool.after_s)
    context = AdapterContext(
        handoff, bind_host=settings.bind_host, public_url=settings.public_url, engine=engine
    )
    adapters = build_adapters(settings, roles, context)
    if "http" in roles:
        mount_adapters(app, [a for a in adapters if isinstance(a, HttpAdapter)])
    imap_store = ImapStateStore(engine)

    @app.get("/status/imap", tags=["operations"], summary="Per-mailbox IMAP state")
    def imap_status() -> list[dict[str, object]]:
        return imap_store.status() if settings.imap.mailboxes else []

    # The HTTP server always runs: it serves /healthz and /readyz for every role.
    components: list[Component] = [HttpServer(app, settings.bind_host, settings.http_port)]
    if spool is not None:
        components.append(Drainer(spool, publisher.publish_many))
    components.extend(a for a in adapters if not isinstance(a, HttpAdapter))
    router_engine = None
    if "router" in roles:
        store = router_store(settings)
        router_engine = store.engine
        components.append(Router(kafka, store, publisher))
    queue_engine = None
    if "queue" in roles:
        queue_engine = make_engine(settings.resolved_queue_database_url())
        queue = QueueStore(queue_engine, {t.name: t.agents for t in settings.teams})
        token = settings.api_token.get_secret_value() if settings.api_token else None
        app.include_router(queue_router(queue, blobs, publisher, token))
        install_denied_handler(app)
        components.append(QueueSink(kafka, queue, rebuild=rebuild_queue))
    pipeline = Pipeline(settings, publisher, engine, readiness, components, handoff)
    pipeline.started = started
    pipeline.router_engine = router_engine
    pipeline.queue_engine = queue_engine
    return pipeline


def run(settings: Settings, roles: frozenset[str] = ROLES, *, rebuild_queue: bool = False) -> int:
    """`switchboard run` (every role) or one role, until SIGTERM or Ctrl-C."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with kafka_available(settings) as broker:
        report = ensure_topics(settings.kafka)
        log.info(
            "topics ready",
            extra={
                "topics_created": list(report.created),
                "topics_existing": list(report.existing),
            },
        )
        pipeline = build_pipeline(settings, roles, rebuild_queue=rebuild_queue)
        revision = upgrade(pipeline.engine)
        if pipeline.queue_engine is not None and settings.queue_database_url is not None:
            upgrade(pipeline.queue_engine)
        log.info("database ready", extra={"revision": revision})

        def force_exit() -> None:
            if broker is not None:
                broker.stop()
            os._exit(130)

        async def main() -> None:
            stop = asyncio.Event()
            install_signal_handlers(stop, force_exit)
            await run_components(
                pipeline.components,
                stop=stop,
                shutdown_timeout_s=settings.shutdown_timeout_s,
                on_started=pipeline.started.set,
            )

        try:
            asyncio.run(main())
        finally:
            pipeline.close()
    log.info("stopped")
    return 0
