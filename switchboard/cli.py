"""The `switchboard` command: a thin translation of arguments into calls."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from switchboard.settings import ConfigError, Settings, load_settings, masked_dump

log = logging.getLogger("switchboard")


def _cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings)


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({args.role}))


def _cmd_router(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({"router"}))


def _cmd_sink_queue(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.bootstrap import run

    return run(settings, frozenset({"queue"}), rebuild_queue=args.rebuild)


def _cmd_contacts_assign(settings: Settings, args: argparse.Namespace) -> int:
    import uuid

    from router.store import UnknownContact, UnknownOwner, topic_of
    from switchboard.bootstrap import router_store
    from switchboard.db import upgrade
    from switchboard.kafka import Publisher, PublishError

    try:
        contact_id = uuid.UUID(args.contact)
    except ValueError:
        print(f"error: {args.contact!r} is not a contact id (a UUID)", file=sys.stderr)
        return 2
    store = router_store(settings)
    upgrade(store.engine)
    try:
        event = store.assign(contact_id, args.owner)
    except UnknownContact:
        print(f"error: no contact {contact_id}", file=sys.stderr)
        return 1
    except UnknownOwner:
        print(
            f"error: {args.owner!r} is not an agent or team of the configuration", file=sys.stderr
        )
        return 2
    print(f"contact {event.key} now owned by {args.owner} (event {event.id})")
    if not settings.kafka.bootstrap:
        print("owner.assigned is recorded; the running router publishes it")
        return 0
    publisher = Publisher(settings.kafka)
    try:
        publisher.publish(topic_of(event), event)
        store.mark_published([event.id])
        print("owner.assigned published")
    except PublishError as exc:
        print(f"owner.assigned recorded, not yet published ({exc}); the router will retry")
    finally:
        publisher.close()
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
    from ingest.imap_state import ImapStateStore
    from switchboard.db import make_engine, upgrade

    engine = make_engine(settings.resolved_database_url())
    upgrade(engine)
    store = ImapStateStore(engine)
    rows = store.status()
    configured = {m.name for m in settings.imap.mailboxes}
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


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.status import collect, render

    report = collect(settings)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def _cmd_db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    from switchboard.db import make_engine, upgrade

    revision = upgrade(make_engine(settings.resolved_database_url()))
    print(f"database at revision {revision}")
    return 0


def _cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.broker import MEMORY_WARNING, EmbeddedBroker

    with EmbeddedBroker(port=args.port, log_path=settings.data_dir / "tansu.log") as broker:
        print(broker.bootstrap, flush=True)
        print(f"WARNING: {MEMORY_WARNING}", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    return 0


def _cmd_topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.topics import ensure_topics

    if not settings.kafka.bootstrap:
        print("SWITCHBOARD_KAFKA_BOOTSTRAP is not set: which broker?", file=sys.stderr)
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
            print(f"out of date: {directory / name}", file=sys.stderr)
        return 1 if stale else 0
    for name in export(directory):
        print(f"wrote {directory / name}")
    return 0


def _cmd_config_check(settings: Settings, _args: argparse.Namespace) -> int:
    # Loading already validated everything; reaching here means it is valid.
    source = settings.config or "no config file (environment only)"
    print(f"ok: {source}")
    return 0


def _cmd_config_show(settings: Settings, _args: argparse.Namespace) -> int:
    from ingest.registry import discover

    data = masked_dump(settings)
    # What the enabled adapters of [adapters.*] will run with: file and environment.
    data["adapter_settings"] = {
        name: info.adapter.settings_from(settings).model_dump(mode="json")
        for name, info in discover().items()
        if info.adapter is not None
        and getattr(info.adapter, "config_section", None) is None
        and info.adapter.enabled_in(settings)
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

    p = sub.add_parser("status", help="consumer lag, spool depth, counts, mailboxes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=_cmd_status)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Inbound messages from every channel: one schema, one contact, one owner.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline in one process")
    p.set_defaults(func=_cmd_run)

    ingest = sub.add_parser("ingest", help="run one ingest role").add_subparsers(
        dest="role", required=True, metavar="ROLE"
    )
    p = ingest.add_parser("http", help="Twilio and web hook endpoints (with /healthz, /readyz)")
    p.set_defaults(func=_cmd_ingest)
    p = ingest.add_parser("smtp", help="the SMTP server (with /healthz, /readyz on HTTP)")
    p.set_defaults(func=_cmd_ingest)
    p = ingest.add_parser("imap", help="the IMAP pollers (with /healthz, /readyz on HTTP)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("router", help="run the router: dedupe, contact, owner")
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
    p.set_defaults(func=_cmd_sink_queue)

    contacts = sub.add_parser("contacts", help="the contact directory").add_subparsers(
        dest="contacts_command", required=True, metavar="ACTION"
    )
    p = contacts.add_parser("assign", help="give a contact a new owner (emits owner.assigned)")
    p.add_argument("contact", help="contact id")
    p.add_argument("owner", help="an agent or team of the configuration")
    p.set_defaults(func=_cmd_contacts_assign)

    db = sub.add_parser("db", help="the database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    p = db.add_parser("upgrade", help="apply pending migrations (run does it at start)")
    p.set_defaults(func=_cmd_db_upgrade)

    _add_operations(sub)
    return parser


#: Every runnable command path, for checks that docker-compose commands are real.
def command_paths(parser: argparse.ArgumentParser | None = None) -> set[tuple[str, ...]]:
    parser = parser or build_parser()
    paths: set[tuple[str, ...]] = set()

    def walk(p: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        subparsers = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            paths.add(prefix)
            return
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, (*prefix, name))

    walk(parser, ())
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(getattr(args, "file", None))
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    from switchboard.broker import BrokerError
    from switchboard.logs import configure_logging
    from switchboard.runtime import StartupError

    configure_logging(settings.log_level, settings.log_format)
    try:
        code: int = args.func(settings, args)
    except KeyboardInterrupt:
        return 130
    except (StartupError, BrokerError) as exc:
        log.error("switchboard %s could not start: %s", args.command, exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("switchboard %s failed", args.command)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
