"""The `switchboard` command: a thin translation of arguments into calls."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from switchboard.logs import stderr_line
from switchboard.settings import ConfigError, Settings, load_settings, masked_dump

if TYPE_CHECKING:
    from router.store import RouterStore
    from sinks.agents import AgentStore
    from switchboard.events import Event

log = logging.getLogger("switchboard")


def _cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings)


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run, supervise
    from switchboard.supervisor import join_fleet

    worker = join_fleet()
    if worker is None and args.role in ("http", "smtp"):
        from switchboard.bootstrap import edge_workers

        count = edge_workers(settings, args.role, getattr(args, "workers", None))
        if count > 1:
            return supervise(settings, args.role, count, args.file)
    return run(settings, frozenset({args.role}), worker=worker)


def _cmd_router(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({"router"}))


def _cmd_sink_queue(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({"queue"}), rebuild_queue=args.rebuild)


def _cmd_sink_archive(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({"archive"}))


def _contact_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        stderr_line(f"error: {text!r} is not a contact id (a UUID)")
        return None


def _publish_recorded(settings: Settings, store: RouterStore, event: Event) -> None:
    """Publish an event the directory recorded as pending; if Kafka is away, the
    running router's relay publishes it later."""
    from router.store import topic_of
    from switchboard.kafka import Publisher, PublishError

    kind = event.type.removeprefix("io.switchboard.").removesuffix(".v1")
    if not settings.kafka.bootstrap:
        print(f"{kind} is recorded; the running router publishes it")
        return
    publisher = Publisher(settings.kafka)
    try:
        publisher.publish(topic_of(event), event)
        store.mark_published([event.id])
        print(f"{kind} published")
    except PublishError as exc:
        print(f"{kind} recorded, not yet published ({exc}); the router will retry")
    finally:
        publisher.close()


def _directory(settings: Settings) -> RouterStore:
    from switchboard.bootstrap import router_store
    from switchboard.databases import upgrade

    store = router_store(settings)
    upgrade(store.engine, ["router"])
    return store


def _cmd_contacts_assign(settings: Settings, args: argparse.Namespace) -> int:
    from router.store import UnknownContact, UnknownOwner

    contact_id = _contact_id(args.contact)
    if contact_id is None:
        return 2
    store = _directory(settings)
    try:
        event = store.assign(contact_id, args.owner, by=args.by)
    except UnknownContact:
        stderr_line(f"error: no contact {contact_id}")
        return 1
    except UnknownOwner:
        stderr_line(f"error: {args.owner!r} is not an agent or team of the configuration")
        return 2
    print(f"contact {event.key} now owned by {args.owner} (event {event.id})")
    _publish_recorded(settings, store, event)
    return 0


def _cmd_contacts_merge(settings: Settings, args: argparse.Namespace) -> int:
    """merge: OTHER goes into CONTACT; unmerge: MERGED comes back out of CONTACT."""
    from router.store import MergeRefused, UnknownContact

    contact_id, other_id = _contact_id(args.contact), _contact_id(args.other)
    if contact_id is None or other_id is None:
        return 2
    store = _directory(settings)
    action = store.merge if args.contacts_command == "merge" else store.unmerge
    try:
        event = action(contact_id, other_id, by=args.by)
    except UnknownContact as exc:
        stderr_line(f"error: no contact {exc}")
        return 1
    except MergeRefused as exc:
        stderr_line(f"error: {exc}")
        return 1
    if args.contacts_command == "merge":
        print(f"contact {other_id} merged into {event.key} (event {event.id})")
    else:
        print(f"contact {other_id} restored, apart from {event.key} (event {event.id})")
    _publish_recorded(settings, store, event)
    return 0


def _agents(settings: Settings) -> AgentStore:
    from switchboard.bootstrap import agent_store
    from switchboard.databases import upgrade
    from switchboard.db import make_engine

    engine = make_engine(settings.resolved_queue_database_url())
    upgrade(engine, ["queue"])  # the agents' tables are the queue stage's
    return agent_store(settings, engine)


def _cmd_agents(settings: Settings, args: argparse.Namespace) -> int:
    """set-password, token, revoke: an agent of [[teams]] as a person."""
    from sinks.agents import UnknownAgent

    store = _agents(settings)
    try:
        if args.agents_command == "set-password":
            if args.stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    stderr_line("error: the two passwords differ")
                    return 1
            store.set_password(args.name, password)
            print(f"password of {args.name} set; their earlier sessions are ended")
        elif args.agents_command == "token":
            token = store.issue_token(args.name)
            print(token)
            stderr_line(f"a personal API token of {args.name}: shown once, kept only as a digest")
        else:
            tokens, sessions = store.revoke(args.name)
            print(f"{args.name}: {tokens} token(s) revoked, {sessions} session(s) ended")
    except UnknownAgent:
        stderr_line(f"error: {args.name!r} is not an agent of the configuration ([[teams]] agents)")
        return 2
    except ValueError as exc:
        stderr_line(f"error: {exc}")
        return 1
    return 0


def _cmd_adapters_list(settings: Settings, args: argparse.Namespace) -> int:
    """Installed channel adapters, whether the configuration enables them, and errors."""
    from ingest.registry import discover

    rows = []
    for info in discover().values():
        enabled = None if info.adapter is None else bool(info.adapter.enabled_in(settings))
        rows.append(
            {
                "name": info.name,
                "enabled": enabled,
                "package": info.package,
                "target": info.target,
                "summary": None if info.adapter is None else info.adapter.summary,
                "error": info.error,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "broken" if row["error"] else ("enabled" if row["enabled"] else "disabled")
            print(f"{row['name']:<10} {state:<9} {row['package'] or '?'}  {row['target']}")
            print(f"           {row['error'] or row['summary']}")
    return 1 if any(row["error"] for row in rows) else 0


def _cmd_imap_status(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.imap import ImapAdapter
    from ingest.imap_state import ImapStateStore
    from switchboard.databases import upgrade
    from switchboard.db import make_engine

    engine = make_engine(settings.resolved_database_url())
    upgrade(engine, ["ingest"])
    store = ImapStateStore(engine)
    rows = store.status()
    configured = {m.name for m in ImapAdapter.settings_from(settings).mailboxes}
    for name in sorted(configured - {str(r["mailbox"]) for r in rows}):
        rows.append(
            {
                "mailbox": name,
                "connected": False,
                "last_success": None,
                "last_error": "never polled",
                "ingested": 0,
                "folders": {},
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no IMAP mailboxes configured ([[imap.mailboxes]] in the config file)")
    for row in rows:
        state = "connected" if row["connected"] else "disconnected"
        print(
            f"{row['mailbox']}: {state}, {row['ingested']} ingested, "
            f"last success {row['last_success'] or 'never'}"
        )
        folders = row["folders"]
        for folder, cp in folders.items() if isinstance(folders, dict) else []:
            print(f"  {folder}: UIDVALIDITY {cp['uidvalidity']}, last UID {cp['last_uid']}")
        if row.get("last_error"):
            print(f"  last error: {row['last_error']}")
    return 0


def _cmd_blobs_gc(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from switchboard.blobs import collect_garbage, open_blob_store
    from switchboard.bootstrap import blob_references
    from switchboard.databases import upgrade_databases
    from switchboard.db import make_engine

    engine = make_engine(settings.resolved_database_url())
    queue_engine = engine
    if settings.queue_database_url is not None:
        queue_engine = make_engine(settings.resolved_queue_database_url())
    upgrade_databases(settings, engine, queue_engine)
    retention = timedelta(days=settings.blobs.retention_days)
    store = open_blob_store(settings.data_dir / "blobs", settings.blobs.layout)
    try:
        report = collect_garbage(
            store,
            blob_references(settings, engine, queue_engine),
            retention,
            dry_run=args.dry_run,
        )
    finally:
        store.close()
        engine.dispose()
        queue_engine.dispose()
    verb = "would delete" if args.dry_run else "deleted"
    for sha256, size in report.deleted:
        print(f"{verb} {sha256} ({size} bytes)")
    print(
        f"{report.scanned} blobs: {verb} {len(report.deleted)} ({report.bytes_freed} bytes), "
        f"kept {report.referenced} referenced and {report.young} younger than "
        f"{settings.blobs.retention_days:g} days"
    )
    if report.temporaries:
        size = sum(size for _, size in report.temporaries)
        print(
            f"{verb} {len(report.temporaries)} temporary files of writes that never "
            f"finished ({size} bytes)"
        )
    return 0


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.status import collect, render

    report = collect(settings)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def _cmd_events_tail(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.status import bootstrap_of, embedded_bootstrap
    from switchboard.tail import (
        Filter,
        as_json,
        parse_since,
        render,
        tail,
        topic_names,
        type_names,
    )

    bootstrap = bootstrap_of(settings)
    if bootstrap is None:
        stderr_line(
            "no broker: set SWITCHBOARD_KAFKA_BOOTSTRAP, or start `switchboard run` "
            f"with this data dir ({settings.data_dir})"
        )
        return 2
    try:
        topics = topic_names(args.topic)
        types = type_names(args.type)
        start = parse_since(args.since) if args.since else args.start
    except ValueError as exc:
        stderr_line(f"error: {exc}")
        return 2
    # The data dir's embedded broker moves with each `switchboard run`: followed.
    data_dir = settings.data_dir
    follow = None if settings.kafka.bootstrap else (lambda: embedded_bootstrap(data_dir))
    settings.kafka.bootstrap = bootstrap
    keep = Filter(types=types, contact=args.contact)
    rows = tail(
        settings.kafka,
        topics,
        start=start,
        keep=keep,
        limit=args.max,
        idle_exit_s=args.idle_exit,
        follow=follow,
        notice=lambda text: stderr_line(f"events tail: {text}"),
    )
    for row in rows:
        print(as_json(row) if args.json else render(row), flush=True)
    return 0


def _cmd_db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.databases import describe, upgrade_databases
    from switchboard.db import make_engine

    engine = make_engine(settings.resolved_database_url())
    queue_engine = None
    if settings.queue_database_url is not None:
        queue_engine = make_engine(settings.resolved_queue_database_url())
    revisions = upgrade_databases(settings, engine, queue_engine)
    print(f"database at revision {describe(revisions)}")
    return 0


def _cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.broker import MEMORY_WARNING, EmbeddedBroker

    with EmbeddedBroker(port=args.port, log_path=settings.data_dir / "tansu.log") as broker:
        print(broker.bootstrap, flush=True)
        stderr_line(f"WARNING: {MEMORY_WARNING}")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    return 0


def _cmd_topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.topics import ensure_topics

    if not settings.kafka.bootstrap:
        stderr_line("SWITCHBOARD_KAFKA_BOOTSTRAP is not set: which broker?")
        return 2
    if args.partitions:
        settings.kafka.partitions = args.partitions
    report = ensure_topics(settings.kafka)
    for topic in report.created:
        print(f"created {topic} ({settings.kafka.partitions} partitions)")
    for topic in report.existing:
        print(f"exists  {topic}")
    return 0


def _cmd_schema_export(_settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.schemas import drift, export

    directory = Path(args.dir)
    if args.check:
        stale = drift(directory)
        for name in stale:
            stderr_line(f"out of date: {directory / name}")
        return 1 if stale else 0
    for name in export(directory):
        print(f"wrote {directory / name}")
    return 0


def _cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard import send

    try:
        if args.send_command == "email":
            default = send.default_recipient(settings)
            recipients = args.to or ([default] if default else [])
            if not recipients:
                stderr_line("error: --to is needed (no SWITCHBOARD_SMTP_DOMAINS to guess from)")
                return 2
            answer = send.send_email(
                settings,
                sender=args.sender,
                recipients=recipients,
                subject=args.subject,
                text=args.text,
                server=args.server,
            )
        elif args.send_command == "sms":
            answer = send.send_sms(
                settings, sender=args.sender, text=args.text, to=args.to, base=args.url
            )
        else:
            form = None
            if args.form is not None:
                form = [tuple(item.split("=", 1)) for item in args.form]
                if any(len(pair) != 2 for pair in form):
                    stderr_line("error: --form takes key=value")
                    return 2
            answer = send.send_hook(
                settings,
                args.hook,
                payload=args.json,
                form=form,
                idempotency_key=args.idempotency_key,
                base=args.url,
            )
    except send.SendError as exc:
        stderr_line(f"error: {exc}")
        return 2
    print(answer.text)
    return 0 if answer.ok else 1


def _add_send(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`switchboard send email|sms|hook`: try a channel against the running pipeline."""
    send = sub.add_parser(
        "send",
        help="send one message to the running pipeline, signed as the real sender signs it",
        description=(
            "Send one message to a running `switchboard run` (or its ingest roles), the "
            "way the real sender does: email over SMTP, an SMS as Twilio's signed web hook "
            "request, a post to a configured [[webhooks]] entry signed with its secret. "
            "Prints the server's answer; exit 0 when it accepted the message, 1 when it "
            "refused it, 2 when nothing could be sent."
        ),
    ).add_subparsers(dest="send_command", required=True, metavar="CHANNEL")
    p = send.add_parser("email", help="an email over SMTP (to SWITCHBOARD_SMTP_PORT)")
    p.add_argument("--from", dest="sender", required=True, help="sender address")
    p.add_argument(
        "--to",
        action="append",
        help="recipient (repeatable; default: support@ the first SMTP domain)",
    )
    p.add_argument("--subject", default="Hello", help="subject (default: Hello)")
    p.add_argument("--text", default="Hello from switchboard send.", help="the body")
    p.add_argument("--server", help="HOST:PORT of the SMTP server (default: this machine's)")
    _config_option(p)
    p.set_defaults(func=_cmd_send)
    p = send.add_parser(
        "sms",
        help="an SMS as Twilio posts it, signed with SWITCHBOARD_TWILIO_AUTH_TOKEN",
    )
    p.add_argument("--from", dest="sender", required=True, help="the customer's number, E.164")
    p.add_argument("--to", default="+15005550006", help="your Twilio number")
    p.add_argument("--text", required=True, help="the message")
    p.add_argument("--url", help="base URL of the HTTP server (default: this machine's)")
    _config_option(p)
    p.set_defaults(func=_cmd_send)
    p = send.add_parser("hook", help="a post to a configured web hook, signed as it requires")
    p.add_argument("hook", help="the hook's name ([[webhooks]] name)")
    body = p.add_mutually_exclusive_group(required=True)
    body.add_argument("--json", help="the JSON body")
    body.add_argument("--form", action="append", help="a form field key=value (repeatable)")
    p.add_argument("--idempotency-key", help="sent as the Idempotency-Key header")
    p.add_argument("--url", help="base URL of the HTTP server (default: this machine's)")
    _config_option(p)
    p.set_defaults(func=_cmd_send)


#: Variables Switchboard reads that no settings class declares.
OTHER_VARIABLES = frozenset({"SWITCHBOARD_CONFIG", "SWITCHBOARD_TEST_KAFKA_BOOTSTRAP"})


def _cmd_config_check(settings: Settings, _args: argparse.Namespace) -> int:
    # Loading already validated everything; reaching here means it is valid.
    import difflib

    from switchboard.settings import known_env_vars, secrets_in_file

    # A misspelt variable is read by nothing: said here, with the likely one (a
    # misspelt SWITCHBOARD_KAFKA_BOOTSTRAP passed the check; operator review).
    known = known_env_vars() | OTHER_VARIABLES
    for name in sorted(n for n in os.environ if n.startswith("SWITCHBOARD_") and n not in known):
        if name.startswith("SWITCHBOARD_TEST_"):
            continue  # the test suite's own
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        stderr_line(f"warning: {name} is set but no setting reads it{hint}")
    for where in secrets_in_file(settings):
        stderr_line(f"warning: a credential written in the config file: {where}")
    source = settings.config or "no config file (environment only)"
    print(f"ok: {source}")
    return 0


def _cmd_config_show(settings: Settings, _args: argparse.Namespace) -> int:
    from ingest.registry import discover

    data = masked_dump(settings)
    # What the enabled adapters will run with, built-ins included: file and environment.
    data["adapter_settings"] = {
        name: info.adapter.settings_from(settings).model_dump(mode="json")
        for name, info in discover().items()
        if info.adapter is not None and info.adapter.enabled_in(settings)
    }
    print(json.dumps(data, indent=2))
    return 0


def _add_operations(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The inspection and maintenance commands."""
    adapters = sub.add_parser("adapters", help="channel adapters").add_subparsers(
        dest="adapters_command", required=True, metavar="ACTION"
    )
    p = adapters.add_parser("list", help="installed adapters, enabled or not; exit 1 if broken")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_adapters_list)

    imap = sub.add_parser("imap", help="IMAP mailboxes").add_subparsers(
        dest="imap_command", required=True, metavar="ACTION"
    )
    p = imap.add_parser("status", help="per-mailbox state: connected, last UID, errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_imap_status)

    blobs = sub.add_parser("blobs", help="the blob store").add_subparsers(
        dest="blobs_command", required=True, metavar="ACTION"
    )
    p = blobs.add_parser(
        "gc", help="delete blobs no stored message references, older than the retention"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    p.set_defaults(func=_cmd_blobs_gc)

    p = sub.add_parser("status", help="consumer lag, spool depth, counts, mailboxes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=_cmd_status)

    events = sub.add_parser("events", help="the event stream").add_subparsers(
        dest="events_command", required=True, metavar="ACTION"
    )
    p = events.add_parser("tail", help="follow the topics: one line per event (or --json)")
    p.add_argument(
        "--topic",
        action="append",
        help="inbound, routed, contacts or deadletter (repeatable; default: all four)",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--from-beginning",
        dest="start",
        action="store_const",
        const="beginning",
        default="end",
        help="start at the earliest offsets (default: from now)",
    )
    when.add_argument("--since", help="start at a time: 10m, 2h, 1d, or ISO 8601")
    p.add_argument(
        "--type", action="append", help="only this event type, e.g. message.routed (repeatable)"
    )
    p.add_argument("--contact", help="only events about this contact id")
    p.add_argument("--json", action="store_true", help="JSON lines instead of readable lines")
    p.add_argument("--max", type=int, default=None, help="stop after this many events")
    p.add_argument(
        "--idle-exit", type=float, default=None, help="stop after this many seconds without events"
    )
    p.set_defaults(func=_cmd_events_tail)

    p = sub.add_parser("broker", help="run the embedded in-memory Kafka broker alone")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.set_defaults(func=_cmd_broker)

    topics = sub.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="topics_command", required=True, metavar="ACTION"
    )
    p = topics.add_parser("create", help="create the missing switchboard topics")
    p.add_argument("--partitions", type=int, default=None, help="override partition count")
    p.set_defaults(func=_cmd_topics_create)

    schema = sub.add_parser("schema", help="event schemas").add_subparsers(
        dest="schema_command", required=True, metavar="ACTION"
    )
    p = schema.add_parser("export", help="write JSON Schema files generated from the models")
    p.add_argument("--dir", default="schemas", help="target directory (default: schemas)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    p.set_defaults(func=_cmd_schema_export)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    p = config.add_parser("show", help="print the effective settings, secrets masked")
    p.set_defaults(func=_cmd_config_show)
    p = config.add_parser("check", help="validate the environment and a config file")
    p.add_argument("file", nargs="?", type=Path, help="TOML file (default: SWITCHBOARD_CONFIG)")
    p.set_defaults(func=_cmd_config_check)


RUN_EPILOG = """\
settings (environment variables; `switchboard config show` prints them all):
  SWITCHBOARD_SMTP_DOMAINS      domains to receive mail for (none: every recipient refused)
  SWITCHBOARD_BIND_HOST         address to listen on (127.0.0.1)
  SWITCHBOARD_HTTP_PORT         HTTP port (8080): hooks, /queue, /api, /healthz, /metrics
  SWITCHBOARD_SMTP_PORT         SMTP port (2525)
  SWITCHBOARD_DATA_DIR          SQLite database, blobs, spool (./var)
  SWITCHBOARD_DATABASE_URL      SQLAlchemy URL instead of SQLite, e.g. postgresql://...
  SWITCHBOARD_KAFKA_BOOTSTRAP   host:port of Kafka (unset: an embedded in-memory broker)
  SWITCHBOARD_TWILIO_AUTH_TOKEN Twilio auth token (unset: every Twilio request refused)
  SWITCHBOARD_PUBLIC_URL        the URL Twilio calls, behind a TLS proxy
  SWITCHBOARD_API_TOKEN         token of the queue API and page (unset: loopback only)
  SWITCHBOARD_CONFIG            the TOML file (./switchboard.toml when it exists)
  SWITCHBOARD_LOG_FORMAT        json (default) or text
The README's Configuration section lists every setting and the TOML sections.
"""


#: The distribution's name (pyproject.toml); the command and packages are `switchboard`.
DISTRIBUTION = "switchboard-inbound"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="file",
        type=Path,
        metavar="FILE",
        help="the TOML configuration (default: SWITCHBOARD_CONFIG, else ./switchboard.toml)",
    )


def _workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("between 1 and 64")
    return value


def _workers_option(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help=(
            f"processes sharing the port (default: [{section}] workers, else one per CPU "
            "core); each has its own Kafka producer and spool file"
        ),
    )


def _add_people(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """contacts (the directory: assign, merge, unmerge) and agents (credentials)."""
    contacts = sub.add_parser("contacts", help="the contact directory").add_subparsers(
        dest="contacts_command", required=True, metavar="ACTION"
    )
    p = contacts.add_parser("assign", help="give a contact a new owner (emits owner.assigned)")
    p.add_argument("contact", help="contact id")
    p.add_argument("owner", help="an agent or team of the configuration")
    p.add_argument("--by", help="who did it (recorded in the event)")
    p.set_defaults(func=_cmd_contacts_assign)
    p = contacts.add_parser(
        "merge", help="merge OTHER into CONTACT, as an agent confirms (emits contact.merged)"
    )
    p.add_argument("contact", help="the contact that stays (keeps its owner)")
    p.add_argument("other", help="the contact merged into it")
    p.add_argument("--by", help="who did it (recorded in the event)")
    p.set_defaults(func=_cmd_contacts_merge)
    p = contacts.add_parser(
        "unmerge", help="undo the merge of MERGED into CONTACT (emits contact.unmerged)"
    )
    p.add_argument("contact", help="the contact it was merged into")
    p.add_argument("other", metavar="merged", help="the merged contact to restore")
    p.add_argument("--by", help="who did it (recorded in the event)")
    p.set_defaults(func=_cmd_contacts_merge)

    agents = sub.add_parser(
        "agents", help="agents as people: passwords, personal tokens"
    ).add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    p = agents.add_parser("set-password", help="set an agent's password (ends their sessions)")
    p.add_argument("name", help="an agent of [[teams]]")
    p.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (scripts)"
    )
    p.set_defaults(func=_cmd_agents)
    p = agents.add_parser("token", help="issue a personal API token (printed once)")
    p.add_argument("name", help="an agent of [[teams]]")
    p.set_defaults(func=_cmd_agents)
    p = agents.add_parser("revoke", help="revoke every token of an agent and end their sessions")
    p.add_argument("name", help="the agent")
    p.set_defaults(func=_cmd_agents)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Inbound messages from every channel: one schema, one contact, one owner.",
    )
    parser.add_argument("--version", action="version", version=f"switchboard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run the whole pipeline in one process",
        description=(
            "Run the whole pipeline in one process: an embedded broker (unless "
            "SWITCHBOARD_KAFKA_BOOTSTRAP is set), SMTP, HTTP (hooks, API, /queue page), "
            "IMAP, the router, the queue sink and the archive."
        ),
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_option(p)
    p.set_defaults(func=_cmd_run)

    ingest = sub.add_parser("ingest", help="run one ingest role").add_subparsers(
        dest="role", required=True, metavar="ROLE"
    )
    p = ingest.add_parser("http", help="Twilio and web hook endpoints (with /healthz, /readyz)")
    _config_option(p)
    _workers_option(p, "http")
    p.set_defaults(func=_cmd_ingest)
    p = ingest.add_parser("smtp", help="the SMTP server (with /healthz, /readyz on HTTP)")
    _config_option(p)
    _workers_option(p, "smtp")
    p.set_defaults(func=_cmd_ingest)
    p = ingest.add_parser("imap", help="the IMAP pollers (with /healthz, /readyz on HTTP)")
    _config_option(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("router", help="run the router: dedupe, contact, owner")
    _config_option(p)
    p.set_defaults(func=_cmd_router)

    sinks = sub.add_parser("sink", help="run a sink").add_subparsers(
        dest="sink", required=True, metavar="SINK"
    )
    p = sinks.add_parser("queue", help="the unified queue: read model, /api and the /queue page")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="empty the read model and rebuild it from the earliest offsets",
    )
    _config_option(p)
    p.set_defaults(func=_cmd_sink_queue)
    p = sinks.add_parser("archive", help="every topic as Parquet files (Hive layout) for analysts")
    _config_option(p)
    p.set_defaults(func=_cmd_sink_archive)

    _add_people(sub)

    db = sub.add_parser("db", help="the database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    p = db.add_parser("upgrade", help="apply pending migrations (run does it at start)")
    p.set_defaults(func=_cmd_db_upgrade)

    _add_send(sub)
    _add_operations(sub)
    return parser


#: The commands that run (or check, show, or sign for) adapters: they need every secret
#: the config file names. The router, the sinks and the operations commands do not.
NEED_SECRETS = frozenset({"run", "ingest", "config", "send", "adapters"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    secrets = args.command in NEED_SECRETS
    if not secrets:
        from ingest.settings import secrets_not_needed

        secrets_not_needed()
    try:
        settings = load_settings(getattr(args, "file", None), secrets=secrets)
    except ValidationError as exc:
        stderr_line(f"invalid settings:\n{exc}")
        return 2
    except ConfigError as exc:
        stderr_line(f"invalid configuration: {exc}")
        return 2
    from switchboard.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return _execute(settings, args)


def _execute(settings: Settings, args: argparse.Namespace) -> int:
    """The command, its failures answered with an exit status and one line."""
    from switchboard.broker import BrokerError
    from switchboard.errors import StartupError

    try:
        code: int = args.func(settings, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `switchboard status | head`: the reader left; what it did not read is not
        # an error (it was logged as one, with a traceback: operator review).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (StartupError, BrokerError) as exc:
        log.error("switchboard %s could not start: %s", args.command, exc)
        stderr_line(f"error: {exc}")
        return 1
    except Exception as exc:
        log.exception("switchboard %s failed", args.command)
        stderr_line(f"error: {exc}")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
