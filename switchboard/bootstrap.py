"""Builds the object graph, in one place, for the CLI.

Nothing in the packages connects to anything at import time; this module wires
settings into the broker, the publisher, the database and the components.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from sqlalchemy import Engine

from ingest.evidence import EvidenceBudget
from ingest.handoff import HandOff
from ingest.imap import ImapAdapter
from ingest.imap_state import ImapStateStore
from ingest.journal import Journal
from ingest.registry import discover
from ingest.sdk import Adapter, AdapterContext, HttpAdapter, mount_adapters
from ingest.smtp import SmtpAdapter
from ingest.spool import Drainer, Spool, SpoolBusy, read_depth
from ingest.twilio import TwilioAdapter
from ingest.workers import ParserPool
from sinks.agents import AgentStore
from sinks.api import install_denied_handler, queue_router
from sinks.auth import Access, protect
from sinks.queue import QueueSink, QueueStore
from sinks.search import identity_keys
from switchboard.blobs import BlobCollector, FileBlobStore, References, open_blob_store
from switchboard.broker import BROKER_FILE, MEMORY_WARNING, EmbeddedBroker
from switchboard.config import KafkaSettings
from switchboard.consumer import ConsumerRuntime
from switchboard.databases import describe, upgrade_databases
from switchboard.db import make_engine, normalize_url, ping
from switchboard.errors import StartupError
from switchboard.http import LOOPBACK_HOSTS, Degraded, Readiness, TrustedHosts, create_app
from switchboard.kafka import Publisher, probe_broker
from switchboard.logs import flush_logs, stderr_line
from switchboard.recovery import JournalKeeper
from switchboard.runtime import (
    Component,
    HttpServer,
    ThreadedComponent,
    install_signal_handlers,
    run_components,
)
from switchboard.settings import Settings
from switchboard.supervisor import Supervisor, WorkerSpec, cores, worker_command
from switchboard.topics import DEADLETTER, ensure_topics

if TYPE_CHECKING:
    from router.store import RouterStore
    from sinks.archive import ArchiveSink

# The router's and the archive's modules (pyarrow, the routing store) are imported by
# the functions that build them: an edge worker, one of several per port, never
# loads them (40 MB less a process, and a faster start: README "Several processes
# per port"). test_an_edge_process_loads_no_router_or_archive keeps it so.

log = logging.getLogger(__name__)


@contextlib.contextmanager
def kafka_available(settings: Settings, *, whole: bool) -> Iterator[EmbeddedBroker | None]:
    """Yield with ``settings.kafka.bootstrap`` set: configured, or an embedded broker.

    ``whole``: `switchboard run` (every role, with its journal). One role alone
    gets an embedded broker only when ``[kafka] embedded`` says so: an operator
    whose bootstrap variable was missing or misspelt had an edge answer 2xx into a
    broker of its own, in memory, and every message gone at its stop, with one
    warning line as the only sign (operator review, 2026-12-01)."""
    if settings.kafka.bootstrap:
        yield None
        return
    if not whole and not settings.kafka.embedded:
        raise StartupError(
            "no Kafka: set SWITCHBOARD_KAFKA_BOOTSTRAP (or [kafka] bootstrap). A role "
            "alone on an in-memory broker of its own loses everything it accepts when "
            "it stops; for a trial, SWITCHBOARD_KAFKA_EMBEDDED=true allows it"
        )
    broker = EmbeddedBroker(log_path=settings.data_dir / "tansu.log")
    broker.start()
    settings.kafka.bootstrap = broker.bootstrap
    # `switchboard status` in another shell finds the embedded broker here.
    address_file = settings.data_dir / BROKER_FILE
    address_file.write_text(broker.bootstrap + "\n")
    log.warning(MEMORY_WARNING, extra={"bootstrap": broker.bootstrap})
    stderr_line(f"WARNING: {MEMORY_WARNING}")  # for humans, after the log line above
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
    archives: list[ArchiveSink] = field(default_factory=list)  # among the components

    @property
    def keeper(self) -> JournalKeeper | None:
        """The journal's keeper, on the embedded broker only."""
        return next((c for c in self.components if isinstance(c, JournalKeeper)), None)

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
            if self.handoff.spool is not None:
                self.handoff.spool.close()
            if self.handoff.journal is not None:
                self.handoff.journal.close()
        self.publisher.close(timeout_s=2.0)
        self.engine.dispose()
        if self.router_engine is not None:
            self.router_engine.dispose()
        if self.queue_engine is not None:
            self.queue_engine.dispose()


ROLES = frozenset({"http", "smtp", "imap", "router", "queue", "archive"})
INGEST_ROLES = frozenset({"http", "smtp", "imap"})


def router_store(settings: Settings, engine: Engine | None = None) -> RouterStore:
    """The router's directory over its own engine (SQLite: writers BEGIN IMMEDIATE)."""
    from router.config import routing_config  # noqa: PLC0415 - see the imports
    from router.store import RouterStore  # noqa: PLC0415

    return RouterStore(
        engine or make_engine(settings.resolved_database_url(), sqlite_immediate=True),
        routing_config(settings.router, settings.teams, settings.rules),
        retention=timedelta(days=settings.router.dedupe_retention_days),
    )


def agent_names(settings: Settings) -> list[str]:
    return sorted({a for t in settings.teams for a in t.agents})


def agent_store(settings: Settings, engine: Engine) -> AgentStore:
    """The agents' credentials and sessions, beside the queue read model."""
    return AgentStore(
        engine,
        agent_names(settings),
        session_ttl=timedelta(hours=settings.agents.session_hours),
    )


def agent_access(settings: Settings, queue_engine: Engine) -> Access:
    token = settings.api_token.get_secret_value() if settings.api_token else None
    return Access(
        token,
        agent_store(settings, queue_engine),
        public_url=settings.public_url,
        login_failures_per_client=settings.agents.login_failures_per_client,
        login_failures_per_account=settings.agents.login_failures_per_account,
        login_window_s=settings.agents.login_window_s,
    )


def allowed_hosts(settings: Settings) -> list[str]:
    """SWITCHBOARD_ALLOWED_HOSTS, the loopback names, the public URL's host, and the
    address the server listens on when it is a specific one."""
    hosts = [*LOOPBACK_HOSTS, *settings.allowed_hosts]
    if settings.public_url:
        found = urlsplit(settings.public_url).hostname
        if found:
            hosts.append(found)
    if settings.bind_host not in ("0.0.0.0", "::", ""):  # noqa: S104 - compared, not bound
        hosts.append(settings.bind_host)
    return hosts


def _queue(
    settings: Settings,
    app: FastAPI,
    *,
    engine: Engine,
    access: Access,
    directory: RouterStore,
    blobs: FileBlobStore,
    publisher: Publisher,
    rebuild: bool,
) -> QueueSink:
    """The queue read model's sink, and its API and page on the app."""
    queue = QueueStore(engine, {t.name: t.agents for t in settings.teams})
    region = TwilioAdapter.settings_from(settings).default_region
    app.include_router(
        queue_router(
            queue,
            blobs,
            publisher,
            access,
            directory,
            canonical=lambda query: identity_keys(query, region),
        )
    )
    return QueueSink(
        settings.kafka, queue, rebuild=rebuild, publisher=publisher, policy=settings.consumers
    )


def _guard(app: FastAPI, settings: Settings, access: Access) -> None:
    install_denied_handler(app)
    # The API's description and operations pages are for agents and tools, not
    # for anyone who can reach the port.
    protect(app, access, ("/docs", "/redoc", "/openapi.json", "/status/"))
    app.add_middleware(TrustedHosts, hosts=allowed_hosts(settings))


def blob_references(
    settings: Settings, router_engine: Engine, queue_engine: Engine
) -> list[References]:
    """Every table that references blobs: the router's recorded events (raw payloads
    and attachments of routed messages, kept for the dedupe retention) and the queue
    read model's attachments (kept as long as the message). Dead letters reference
    their raw payload from Kafka only; IMAP state references none."""
    return [
        router_store(settings, router_engine).referenced_blobs,
        QueueStore(queue_engine).referenced_blobs,
    ]


def archive_sink(settings: Settings, publisher: Publisher | None = None) -> ArchiveSink:
    """The archive sink on its configured root (a local directory or an fsspec URL),
    keeping the Iceberg table when ``[archive] iceberg`` is on."""
    from sinks.archive import ArchiveSink  # noqa: PLC0415 - see the imports
    from sinks.archive_files import open_archive  # noqa: PLC0415
    from sinks.archive_iceberg import IcebergTable  # noqa: PLC0415
    from sinks.archive_state import STATE_FILE, ArchiveState  # noqa: PLC0415

    iceberg = None
    if settings.archive.iceberg:
        catalog = settings.archive.iceberg_catalog or settings.resolved_database_url()
        iceberg = IcebergTable(
            settings.archive_root(), normalize_url(catalog), settings.archive.storage_options
        )
    sink = ArchiveSink(
        settings.kafka,
        open_archive(settings.archive_root(), settings.archive.storage_options),
        settings.archive,
        group_id=settings.archive.group_id,
        publisher=publisher,
        policy=settings.consumers,
        iceberg=iceberg,
    )
    sink.archive_handler.state = ArchiveState(settings.data_dir / STATE_FILE)
    return sink


def _archive(settings: Settings, roles: frozenset[str], publisher: Publisher) -> list[ArchiveSink]:
    # `sink archive` runs it; `run` (every role) unless [archive] enabled = false.
    if "archive" not in roles or (roles == ROLES and not settings.archive.enabled):
        return []
    return [archive_sink(settings, publisher)]


def _readiness(
    settings: Settings,
    engine: Engine,
    started: threading.Event,
    components: list[Component],
) -> Readiness:
    readiness = Readiness()
    readiness.add("kafka", lambda: probe_broker(settings.kafka))
    readiness.add("database", lambda: ping(engine))

    def all_started() -> None:
        # The HTTP server starts first (it serves /healthz meanwhile); ready means
        # every component (SMTP, pollers, router, sinks) is serving, and every
        # consumer loop is alive and making progress (not only "started").
        if not started.is_set():
            raise RuntimeError("components are still starting")
        problems = [
            problem
            for component in components
            if isinstance(component, ThreadedComponent)
            and (problem := component.liveness()) is not None
        ]
        if problems:
            raise RuntimeError("; ".join(problems))

    readiness.add("components", all_started)
    return readiness


def _ready_while_spooling(
    readiness: Readiness, settings: Settings, roles: frozenset[str], spool: Spool | None
) -> None:
    """An edge alone with a spool: its Kafka check is :func:`_kafka_or_spool`."""
    if spool is not None and roles <= INGEST_ROLES:
        readiness.add("kafka", _kafka_or_spool(settings.kafka, spool))


def _kafka_or_spool(kafka: KafkaSettings, spool: Spool) -> Callable[[], None]:
    """An edge's Kafka check: while Kafka is away the edge takes messages into its
    spool (durable, answered 2xx/250), so it stays ready, reported ``degraded``, as
    long as the spool has room. Its /readyz answered 503 then, and a load balancer
    or an orchestrator probing it pulled every edge exactly when the spool was there
    to take the outage (operator review, 2026-12-01)."""

    def check() -> None:
        try:
            probe_broker(kafka)
        except Exception as exc:
            if spool.has_room(1):
                raise Degraded(
                    f"Kafka away ({type(exc).__name__}); accepting into the spool "
                    f"({spool.messages} messages held)"
                ) from exc
            raise

    return check


def _spool_base(roles: frozenset[str]) -> str:
    return "-".join(sorted(roles & INGEST_ROLES))


def spool_path(settings: Settings, roles: frozenset[str], worker: int = 0) -> Path:
    # One spool file per process kind, and per worker of a fleet sharing a port
    # (worker 0 keeps the single process's name): its drainer owns (deletes) what
    # it holds, and the file lock in Spool keeps it to one process at a time.
    base = _spool_base(roles)
    return settings.spool_dir() / (f"{base}.{worker}.sqlite3" if worker else f"{base}.sqlite3")


def _open_spool(settings: Settings, path: Path, wait_s: float = 10.0) -> Spool:
    return Spool(
        path,
        max_bytes=settings.spool.max_bytes,
        max_messages=settings.spool.max_messages,
        wait_s=wait_s,
    )


def make_spool(settings: Settings, roles: frozenset[str], worker: int = 0) -> Spool | None:
    """The spool of a process running ingest roles (none if disabled or not ingest)."""
    if not roles & INGEST_ROLES or not settings.spool.enabled:
        return None
    try:
        return _open_spool(settings, spool_path(settings, roles, worker))
    except SpoolBusy as exc:
        raise StartupError(str(exc)) from exc


def orphaned_spools(settings: Settings, roles: frozenset[str], workers: int) -> list[Spool]:
    """The spool files of workers a smaller fleet no longer runs (``<role>.<i>.sqlite3``
    with i >= ``workers``) that still hold events: worker 0 drains them. A file
    another process holds (a worker of an older fleet still stopping) is left to it."""
    if not settings.spool.enabled or not roles & INGEST_ROLES:
        return []
    base = _spool_base(roles)
    pattern = re.compile(rf"{re.escape(base)}\.(\d+)\.sqlite3")
    found: list[Spool] = []
    directory = settings.spool_dir()
    for path in sorted(directory.glob(f"{base}.*.sqlite3")) if directory.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match is None or int(match.group(1)) < workers:
            continue
        try:
            if not read_depth(path).messages:
                continue
            spool = _open_spool(settings, path, wait_s=0)
        except SpoolBusy:
            # Seen again at the next start; `switchboard status` shows its depth.
            log.warning("spool file is held by another process", extra={"path": str(path)})
            continue
        except (sqlite3.Error, OSError) as exc:
            # Not a spool (or damaged): never a reason not to serve. Left as it is.
            log.error(
                "unreadable spool file left alone", extra={"path": str(path), "error": str(exc)}
            )
            continue
        log.warning(
            "draining the spool of a worker this fleet no longer runs",
            extra={"path": str(path), "messages": spool.messages},
        )
        found.append(spool)
    return found


def _drainers(
    settings: Settings,
    roles: frozenset[str],
    worker: WorkerSpec,
    spool: Spool | None,
    publisher: Publisher,
) -> list[Drainer]:
    """The drainer of this process's spool; worker 0 also drains the files of
    workers the fleet no longer runs."""
    limit = publisher.max_event_bytes
    drainers = (
        [] if spool is None else [Drainer(spool, publisher.publish_many, max_event_bytes=limit)]
    )
    if worker.index == 0:
        drainers.extend(
            Drainer(
                orphan,
                publisher.publish_many,
                name=f"spool {orphan.path.name}",
                max_event_bytes=limit,
            )
            for orphan in orphaned_spools(settings, roles, worker.count)
        )
    return drainers


def edge_workers(settings: Settings, role: str, given: int | None) -> int:
    """Processes for `switchboard ingest http|smtp`: --workers, else the setting,
    else one per core."""
    if given is not None:
        return given
    configured = (
        settings.http.workers if role == "http" else SmtpAdapter.settings_from(settings).workers
    )
    return configured or cores()


def supervise(settings: Settings, role: str, count: int, config: Path | None) -> int:
    """Run ``count`` workers of one edge role on shared sockets (switchboard.supervisor)."""
    listen = {"http": (settings.bind_host, settings.http_port)}
    if role == "smtp":
        listen["smtp"] = (settings.bind_host, SmtpAdapter.settings_from(settings).port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Without a configured Kafka the supervisor runs the embedded broker, so the
    # workers share one (each would otherwise start its own).
    with kafka_available(settings, whole=False) as broker:
        supervisor = Supervisor(
            worker_command(role, config),
            count=count,
            listen=listen,
            metrics_dir=settings.data_dir / "metrics" / role,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            env={"SWITCHBOARD_KAFKA_BOOTSTRAP": settings.kafka.bootstrap or ""},
            worker_timeout_s=settings.worker_timeout_s,
            others=lambda: () if broker is None else (broker.pid,),
        )
        return supervisor.run()


def per_worker(settings: Settings, worker: WorkerSpec) -> Settings:
    """The limits one process counts by itself, divided among the fleet's workers
    (see switchboard.supervisor); adapters divide their own through the context."""
    if worker.count == 1:
        return settings
    settings = settings.model_copy(deep=True)
    settings.http.max_connections_per_client = worker.share(
        settings.http.max_connections_per_client
    )
    settings.http.max_body_in_flight = worker.share(settings.http.max_body_in_flight)
    settings.spool.max_bytes = worker.share(settings.spool.max_bytes)
    settings.spool.max_messages = worker.share(settings.spool.max_messages)
    settings.evidence.per_minute = worker.share(settings.evidence.per_minute)
    # evidence.max_bytes is per refused request, not a budget: not divided.
    return settings


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


def make_journal(
    settings: Settings, roles: frozenset[str], broker: EmbeddedBroker | None
) -> Journal | None:
    """The local journal: only `switchboard run` (every role, one process) on the
    embedded broker. An external Kafka's replication is the durability there."""
    if broker is None or roles != ROLES or not settings.spool.journal:
        return None
    return Journal(spool_path(settings, roles))


def _journal_keeper(
    settings: Settings,
    *,
    journal: Journal | None,
    publisher: Publisher,
    engine: Engine,
    queue_engine: Engine | None,
    broker: EmbeddedBroker | None,
    consumers: list[ConsumerRuntime],
) -> list[JournalKeeper]:
    if journal is None or queue_engine is None:
        return []
    # The router's tables are read through the shared engine: the router's own
    # engine begins every transaction IMMEDIATE on SQLite, and the keeper only reads.
    keeper = JournalKeeper(
        journal,
        publisher,
        engine,
        queue_engine,
        data_dir=settings.data_dir,
        broker=broker,
        kafka=settings.kafka,
        consumers=consumers,
    )
    return [keeper]


def _serve_imap_status(app: FastAPI, settings: Settings, engine: Engine) -> None:
    imap_store = ImapStateStore(engine)
    mailboxes = ImapAdapter.settings_from(settings).mailboxes

    @app.get("/status/imap", tags=["operations"], summary="Per-mailbox IMAP state")
    def imap_status() -> list[dict[str, object]]:
        return imap_store.status() if mailboxes else []


def producer_settings(kafka: KafkaSettings, roles: frozenset[str]) -> KafkaSettings:
    """The producer's settings for a process of ``roles``: with an edge among them,
    its senders wait for each acknowledgement, so it batches for ``edge_linger_ms``
    (also for the router and sinks sharing the process, as in `switchboard run`)."""
    if roles & INGEST_ROLES:
        return kafka.model_copy(update={"linger_ms": kafka.edge_linger_ms})
    return kafka


def _wire_archive(
    handoff: HandOff,
    archives: list[ArchiveSink],
    settings: Settings,
    broker: EmbeddedBroker | None,
) -> None:
    """On the embedded broker the archive treats the logs as new at every start and
    after the broker died; ingest's dead letters stay in the journal until the
    archive has them in a file. Without an archive they have no durable home here,
    and what an earlier run journaled is dropped (it would be replayed forever)."""
    if broker is not None and archives:
        from sinks.archive_buffer import BUFFER_FILE, BufferLog  # noqa: PLC0415 - see the imports

        for sink in archives:
            sink.archive_handler.embedded_partitions = settings.kafka.partitions
            sink.archive_handler.buffer_log = BufferLog(settings.data_dir / BUFFER_FILE)
    journal = handoff.journal
    if journal is None:
        return
    if archives:
        archives[0].archive_handler.on_dead_letters_written = journal.forget
        handoff.journal_dead_letters = True
    elif removed := journal.forget_topic(DEADLETTER):
        log.warning(
            "the archive is off: dead letters journaled by an earlier run are dropped",
            extra={"dead_letters": removed},
        )


def _router(settings: Settings, engine: Engine | None, publisher: Publisher) -> ConsumerRuntime:
    from router.service import Router  # noqa: PLC0415 - see the imports

    store = router_store(settings, engine)
    return Router(
        settings.kafka,
        store,
        publisher,
        policy=settings.consumers,
        max_batch=settings.router.poll_records(store.engine.dialect.name),
    )


def _mount_http(
    app: FastAPI, roles: frozenset[str], adapters: list[Adapter[Any]], parsers: ParserPool
) -> list[Component]:
    """Mount the HTTP adapters; the parse processes, when one of them needs them."""
    if "http" not in roles:
        return []
    http_adapters = [a for a in adapters if isinstance(a, HttpAdapter)]
    mount_adapters(app, http_adapters)
    offloading = [a for a in http_adapters if a.offload]
    if not offloading:
        return []
    parsers.preload(HttpAdapter.__module__, *(type(a).__module__ for a in offloading))
    return [parsers]


def build_pipeline(
    settings: Settings,
    roles: frozenset[str] = ROLES,
    *,
    rebuild_queue: bool = False,
    broker: EmbeddedBroker | None = None,
    worker: WorkerSpec | None = None,
) -> Pipeline:
    """Wire the shared clients and the components of the given roles (of one worker
    of a fleet sharing the role's port, when ``worker`` is given)."""
    worker = worker or WorkerSpec(0, 1)
    settings = per_worker(settings, worker)
    kafka = settings.kafka

    def recreate_topics() -> None:
        # An in-memory broker that restarted has lost its topics; a real cluster
        # has them already, and then this is a cheap no-op.
        try:
            ensure_topics(kafka, wait_s=2.0)
        except Exception as exc:  # noqa: BLE001 - best effort; the publish reports the failure
            log.warning("could not re-check topics", extra={"error": repr(exc)})

    publisher = Publisher(producer_settings(kafka, roles), on_new_producer=recreate_topics)
    engine = make_engine(settings.resolved_database_url())
    started = threading.Event()
    components: list[Component] = []
    readiness = _readiness(settings, engine, started, components)
    app = create_app(readiness, settings.http)
    blobs = open_blob_store(settings.data_dir / "blobs", settings.blobs.layout)
    spool = make_spool(settings, roles, worker.index)
    _ready_while_spooling(readiness, settings, roles, spool)
    evidence = EvidenceBudget(
        settings.evidence.per_minute,
        settings.evidence.max_bytes,
        log_every_s=settings.evidence.log_every_s,
    )
    handoff = HandOff(
        publisher,
        blobs,
        spool=spool,
        spool_after_s=settings.spool.after_s,
        evidence=evidence,
        journal=make_journal(settings, roles, broker),
    )
    # Started only if an enabled adapter parses mail in it (the providers).
    parsers = ParserPool(
        settings.http.parse_workers,
        settings.http.parse_timeout_s,
        settings.http.parse_memory_mb,
    )
    context = AdapterContext(
        handoff,
        bind_host=settings.bind_host,
        public_url=settings.public_url,
        engine=engine,
        workers=worker.count,
        sockets=worker.sockets,
        parsers=parsers,
    )
    adapters = build_adapters(settings, roles, context)
    components.extend(_mount_http(app, roles, adapters, parsers))
    _serve_imap_status(app, settings, engine)
    # The HTTP server always runs: it serves /healthz and /readyz for every role.
    components.append(
        HttpServer(
            app,
            settings.bind_host,
            settings.http_port,
            limits=settings.http,
            sock=worker.sockets.get("http"),
        )
    )
    components.extend(_drainers(settings, roles, worker, spool, publisher))
    components.extend(a for a in adapters if not isinstance(a, HttpAdapter))
    consumers: list[ConsumerRuntime] = []
    router_engine = (
        make_engine(
            settings.resolved_database_url(),
            sqlite_immediate=True,
            sqlite_cache_mb=ROUTER_SQLITE_CACHE_MB,
        )
        if roles & {"router", "queue"}
        else None
    )
    if "router" in roles:
        consumers.append(_router(settings, router_engine, publisher))
    queue_engine = None
    access = Access(
        settings.api_token.get_secret_value() if settings.api_token else None,
        public_url=settings.public_url,
    )
    if "queue" in roles:
        queue_engine = make_engine(settings.resolved_queue_database_url())
        access = agent_access(settings, queue_engine)
        # An agent's reassign, merge and unmerge act on the router's directory, as
        # `switchboard contacts` does; its SQLite writers BEGIN IMMEDIATE.
        consumers.append(
            _queue(
                settings,
                app,
                engine=queue_engine,
                access=access,
                directory=router_store(settings, router_engine),
                blobs=blobs,
                publisher=publisher,
                rebuild=rebuild_queue,
            )
        )
    _guard(app, settings, access)
    archives = _archive(settings, roles, publisher)
    consumers.extend(archives)
    _wire_archive(handoff, archives, settings, broker)
    components.extend(consumers)
    components.extend(
        _journal_keeper(
            settings,
            journal=handoff.journal,
            publisher=publisher,
            engine=engine,
            queue_engine=queue_engine,
            broker=broker,
            consumers=consumers,
        )
    )
    if roles == ROLES and settings.blobs.gc_enabled:
        # Only the all-in-one process is sure to share its blob directory with
        # every writer; split deployments run `switchboard blobs gc` from cron.
        components.append(
            BlobCollector(
                blobs,
                blob_references(settings, engine, queue_engine or engine),
                timedelta(days=settings.blobs.retention_days),
                settings.blobs.gc_interval_h * 3600,
            )
        )
    pipeline = Pipeline(
        settings, publisher, engine, readiness, components, handoff, archives=archives
    )
    pipeline.started = started
    pipeline.router_engine = router_engine
    pipeline.queue_engine = queue_engine
    return pipeline


# The router inserts events and messages under random uuid keys, all over their
# indexes: beyond SQLite's default 2 MB page cache most inserts read pages back.
# Measured on the store alone (22,400 records, a 57 MB file): its writes took 57
# instead of 73 us a record. Pages are cached as they are read, per connection: the
# router writes through one, the queue's agent actions read through a few.
ROUTER_SQLITE_CACHE_MB = 64


def quiet_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the start-up heap.

    Everything built at start-up (modules, schemas, SQL statements, settings) lives
    until exit; ``gc.freeze`` moves it out of the collector's reach, so the full
    collections that a busy process triggers no longer walk it. Measured: one
    router +35-50%, ``switchboard ingest http`` alone +25-35% (README, "Router" and
    "Where an edge's time goes"). Raising the first generation's threshold as well
    (20,000 instead of 700) added at most a few percent, within the noise, so
    Python's thresholds stay: garbage is found as soon as before.
    """
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()


def event_loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (libuv, in C) unless ``event_loop = "asyncio"``, else None: asyncio's.

    An HTTP edge spends about a sixth of its time in the event loop and its transports
    (py-spy, README "Where an edge's time goes"); uvloop does that work in C. The SMTP
    edge runs it too since 2026-12-02: aiosmtpd's STARTTLS puts asyncio's own SSL
    protocol on the connection with the transport's public ``set_protocol()``, which
    uvloop's transports have (the SMTP tests, STARTTLS and a large message over TLS
    included, run on both loops); the asyncio loop was 12% of an SMTP edge's samples.
    """
    if settings.event_loop != "auto":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional at import time, chosen per process
    except ImportError:  # pragma: no cover - a dependency; a trimmed install still runs
        return None
    return uvloop.new_event_loop


def run(
    settings: Settings,
    roles: frozenset[str] = ROLES,
    *,
    rebuild_queue: bool = False,
    worker: WorkerSpec | None = None,
) -> int:
    """`switchboard run` (every role) or one role, until SIGTERM or Ctrl-C; as one
    worker of a fleet sharing the role's port when ``worker`` is given."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # A worker of a fleet gets its supervisor's broker (SWITCHBOARD_KAFKA_BOOTSTRAP).
    with kafka_available(settings, whole=roles == ROLES) as broker:
        report = ensure_topics(settings.kafka)
        log.info(
            "topics ready",
            extra={
                "topics_created": list(report.created),
                "topics_existing": list(report.existing),
            },
        )
        pipeline = build_pipeline(
            settings, roles, rebuild_queue=rebuild_queue, broker=broker, worker=worker
        )
        revisions = upgrade_databases(settings, pipeline.engine, pipeline.queue_engine)
        log.info("database ready", extra={"revision": describe(revisions)})
        quiet_garbage_collector()
        for sink in pipeline.archives:
            # Before the journal's replay: the dead letters the archive had buffered
            # are then in files, and forgotten by the journal, not published again.
            sink.archive_handler.recover_buffered()
        if pipeline.keeper is not None:
            # Before the edges listen: what the last run's broker forgot goes out again.
            pipeline.keeper.recover_at_start()

        def force_exit() -> None:
            if broker is not None:
                broker.stop()
            flush_logs()  # os._exit skips logging's shutdown: the lines queued so far
            os._exit(130)

        beating: list[asyncio.Task[None]] = []

        def started() -> None:
            pipeline.started.set()
            if worker is not None:
                # Ready, then alive: the supervisor replaces a worker whose loop hangs.
                beating.append(asyncio.get_running_loop().create_task(worker.beat_forever()))

        async def main() -> None:
            loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            log.info("event loop", extra={"event_loop": loop})
            stop = asyncio.Event()
            # A worker's supervisor forces with SIGKILL; a repeated SIGTERM (systemd
            # signals the whole group, then the supervisor its workers) is not a force.
            install_signal_handlers(stop, force_exit, force_on_repeat=worker is None)
            await run_components(
                pipeline.components,
                stop=stop,
                shutdown_timeout_s=settings.shutdown_timeout_s,
                on_started=started,
            )

        try:
            with asyncio.Runner(loop_factory=event_loop_factory(settings)) as runner:
                runner.run(main())
        finally:
            pipeline.close()
    log.info("stopped")
    return 0
