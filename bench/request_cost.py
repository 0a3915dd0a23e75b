"""The CPU one hook request costs inside Switchboard, without a server or a load generator.

Usage: PYTHONPATH=. .venv/bin/python bench/request_cost.py [--requests 20000]
                                    [--concurrency 64] [--hook twilio|json]
                                    [--kafka real|instant] [--profile OUT.pstats]

It builds the edge's app as `switchboard ingest http` does (``build_pipeline`` with
the http role, the bench's Twilio token and signed JSON hook, blobs in packs under a
temporary directory, the embedded broker), and calls the ASGI app directly with
fresh signed requests (a new message each, as ``bench/http_ingest.py --fresh``),
``--concurrency`` at a time on one uvloop event loop. No socket, no HTTP parser,
no wrk: what is left is Switchboard's own work a request, measured as the
process's CPU time (user + system, every thread: the Kafka sender and the blob
threads included) divided by the requests.

``--kafka instant`` replaces the publisher's send with an acknowledgement that is
already there (nothing leaves the process): the request's cost without
kafka-python. ``--profile`` writes a cProfile of the loop's thread (deterministic,
unlike a sampling profile at saturation; cProfile's own overhead inflates small
calls, so read it for shares, and the unprofiled run for the time).

A study of where the time goes, not a throughput figure: on a server each request
also costs the HTTP layer (about 50 µs here, README "Where one process's request
goes") and shares the cores with the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop
from fastapi import Response

from bench.http_ingest import HOOK_CONFIG, SECRET, TOKEN, json_hook_request, twilio_request
from ingest.handoff import HandOff
from ingest.sdk import HttpAdapter
from ingest.twilio import TwilioAdapter
from ingest.webhook import WebhookAdapter
from switchboard.bootstrap import Pipeline, build_pipeline
from switchboard.broker import EmbeddedBroker
from switchboard.kafka import Ack
from switchboard.logs import configure_logging
from switchboard.runtime import HttpServer
from switchboard.settings import load_settings
from switchboard.topics import ensure_topics

PORT = 8080


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _threads() -> dict[str, float]:
    """CPU seconds by thread name (``/proc``), threads of one name summed."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        name = names.get(int(task.name), "other").rstrip("0123456789_-")
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return found


async def _call(app: Any, url: str, body: bytes, headers: dict[str, str]) -> int:  # noqa: ANN401
    path = url.split(str(PORT), 1)[1]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", f"127.0.0.1:{PORT}".encode()),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", PORT),
        "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # a disconnect never comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _drive(app: Any, requests: list[Any], concurrency: int) -> dict[int, int]:  # noqa: ANN401
    statuses: dict[int, int] = {}
    it = iter(requests)

    async def one() -> None:
        for url, body, headers in it:
            status = await _call(app, url, body, headers)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return statuses


def _skip(stage: str) -> None:
    """Leave one stage out of every request (a study of what each stage costs):
    ``blobs`` (the raw body's fsynced write), ``deliver`` (the whole hand-off: blobs,
    event, Kafka), ``auth`` (the adapter's authenticate: the signature), ``take``
    (normalize and hand-off) or ``handle`` (the adapter's whole cycle: what is left
    is the app's middleware and dispatch)."""

    async def stored(self: object, blobs: object) -> None:
        return None

    async def delivered(self: object, normalized: object) -> None:
        return None

    async def taken(self: HttpAdapter[Any], request: Any) -> Response:  # noqa: ANN401
        return self.accepted(request, None)

    async def handled(self: object, route: object, request: object) -> Response:
        return Response(b"")

    def authenticated(self: object, request: object) -> None:
        return None

    if stage == "blobs":
        HandOff._store = stored  # type: ignore[method-assign]
    elif stage == "deliver":
        HandOff.deliver = delivered  # type: ignore[method-assign,assignment]
    elif stage == "auth":
        TwilioAdapter.authenticate = authenticated  # type: ignore[method-assign]
        WebhookAdapter.authenticate = authenticated  # type: ignore[method-assign]
    elif stage == "take":
        HttpAdapter._take = taken  # type: ignore[method-assign]
    elif stage == "handle":
        HttpAdapter.handle = handled  # type: ignore[method-assign]


def _instant(pipeline: Pipeline) -> None:
    """The publisher's acknowledgement without Kafka: the event is serialized, as
    the real send does, and acknowledged at once."""
    ack = Ack(topic="x", partition=0, offset=0)

    async def instant(topic: str, event: Any, timeout_s: float | None = None) -> Ack:  # noqa: ANN401
        event.value()
        return ack

    pipeline.publisher.apublish = instant  # type: ignore[method-assign]


async def _measure(app: Any, requests: list[Any], args: argparse.Namespace) -> None:  # noqa: ANN401
    warm, measured = requests[:2000], requests[2000:]
    await _drive(app, warm, args.concurrency)
    profiler = cProfile.Profile() if args.profile else None
    threads, cpu, wall = _threads(), _cpu(), time.perf_counter()
    if profiler:
        profiler.enable()
    statuses = await _drive(app, measured, args.concurrency)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    after = _threads()
    n = len(measured)
    print(
        f"{args.hook} kafka={args.kafka} skip={args.skip} c={args.concurrency}: {n} requests, "
        f"statuses {statuses}, {cpu / n * 1e6:.0f} µs CPU and "
        f"{wall / n * 1e6:.0f} µs wall a request ({n / wall:.0f} req/s)"
    )
    for name, seconds in sorted(after.items(), key=lambda kv: -kv[1]):
        spent = seconds - threads.get(name, 0.0)
        if spent > 0:
            print(f"  thread {name}: {spent / n * 1e6:.0f} µs a request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hook", choices=("twilio", "json"), default="twilio")
    parser.add_argument("--kafka", choices=("real", "instant"), default="real")
    parser.add_argument(
        "--skip", choices=("none", "blobs", "deliver", "auth", "take", "handle"), default="none"
    )
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    make = twilio_request if args.hook == "twilio" else json_hook_request
    run = str(time.time_ns())
    requests = [make(PORT, f"{run}-{i}") for i in range(args.requests + 2000)]

    with tempfile.TemporaryDirectory() as data, EmbeddedBroker() as broker:
        config = Path(data) / "switchboard.toml"
        config.write_text(HOOK_CONFIG)
        os.environ.update(
            {
                "SWITCHBOARD_KAFKA_BOOTSTRAP": broker.bootstrap,
                "SWITCHBOARD_DATA_DIR": data,
                "SWITCHBOARD_CONFIG": str(config),
                "SWITCHBOARD_LOG_LEVEL": "WARNING",
                "SWITCHBOARD_TWILIO_AUTH_TOKEN": TOKEN,
                "SWITCHBOARD_SMTP_ENABLED": "false",
                "SWITCHBOARD_HTTP_PORT": str(PORT),
                "SWITCHBOARD_PUBLIC_URL": "",
                "BENCH_SECRET": SECRET,
            }
        )
        settings = load_settings()
        configure_logging(settings.log_level)
        ensure_topics(settings.kafka)
        pipeline = build_pipeline(settings, frozenset({"http"}))
        server = next(c for c in pipeline.components if isinstance(c, HttpServer))
        if args.kafka == "instant":
            _instant(pipeline)
        _skip(args.skip)
        try:
            uvloop.run(_measure(server.app, requests, args))
        finally:
            pipeline.close()


if __name__ == "__main__":
    main()
