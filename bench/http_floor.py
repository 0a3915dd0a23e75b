"""The floor of a durable Twilio hook in Python on this stack: how fast could it be?

Usage: PYTHONPATH=. .venv/bin/python bench/http_floor.py [--seconds 8] [--workers 1,2]
Needs `wrk` (apt-get install wrk).

A study, not a product: one asyncio protocol on uvloop with httptools (no ASGI,
no framework, no pydantic, no metrics, no logging, no limits), which for each
POST does only what durability and the signature need: parse the form, check
Twilio's HMAC-SHA1 over the URL and the sorted fields (hashlib), write the raw
body as a blob with Switchboard's own group commit (`ingest.groupcommit`, the
same fsynced writes as the product), append a small JSON event to kafka-python's
producer (acks=all, idempotent, the product's edge linger, on the event loop) and answer 200 only
once the broker acknowledged it. Each process (``--workers N``: N processes on one
port with SO_REUSEPORT) has its own producer and blob threads, on one embedded
broker. The same fresh signed requests as `bench/http_ingest.py --fresh`: run it
beside `make bench-edges` (the bare FastAPI hook and `switchboard ingest http`),
alternately. The gap between the floor and Switchboard is what Switchboard's layers
cost; the gap between the floor and the bare hook is what a durable hand-off itself
costs in Python with kafka-python here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qsl

import httptools
import uvloop
from kafka import KafkaProducer

from bench.http_ingest import TOKEN, fresh_script, twilio_request, wrk
from ingest.groupcommit import GroupCommit
from normalize.content import Blob
from switchboard.blobs import open_blob_store
from switchboard.broker import EmbeddedBroker, free_port, wait_for_port
from switchboard.config import KafkaSettings

TOPIC = "floor.inbound"
OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: 0\r\n\r\n"
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


def signed(url: str, form: dict[str, str], signature: str) -> bool:
    """Twilio's scheme (the URL, then each field's name and value, sorted)."""
    text = url + "".join(name + form[name] for name in sorted(form))
    mac = hmac.new(TOKEN.encode(), text.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(base64.b64encode(mac), signature.encode())


class Floor(asyncio.Protocol):
    def __init__(self, server: FloorServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.signature = ""
        self.body: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def answer(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)  # wrk hangs up at the end with calls in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-twilio-signature":
            self.signature = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        task = asyncio.ensure_future(self.server.take(self, body, self.url, self.signature))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class FloorServer:
    def __init__(self, port: int, bootstrap: str, blobs: Path, layout: str) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            # The product's edge linger (5 ms until 2026-12-02, then 1), so the gap
            # to Switchboard stays what its layers cost.
            linger_ms=KafkaSettings().edge_linger_ms,
        )
        self.group = GroupCommit(open_blob_store(blobs, layout), ThreadPoolExecutor(16))

    async def take(self, conn: Floor, body: bytes, path: bytes, signature: str) -> None:
        if conn.transport is None:
            return
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not signed(self.base + path.decode(), form, signature):
            conn.answer(FORBIDDEN)
            return
        raw = Blob.of(body, "application/x-www-form-urlencoded")
        try:
            await self.group.store((raw,))
            event = json.dumps(
                {
                    "id": str(uuid.uuid4()),
                    "channel": "sms",
                    "from": form.get("From"),
                    "text": form.get("Body"),
                    "provider_message_id": form.get("MessageSid"),
                    "raw": {"sha256": raw.ref.sha256, "size": raw.ref.size},
                }
            ).encode()
            loop = asyncio.get_running_loop()
            acked: asyncio.Future[None] = loop.create_future()
            future = self.producer.send(TOPIC, key=form.get("From", "").encode(), value=event)
            future.add_callback(lambda _m: loop.call_soon_threadsafe(_done, acked, None))
            future.add_errback(lambda e: loop.call_soon_threadsafe(_done, acked, e))
            await acked
        except Exception:  # noqa: BLE001 - the sender retries, as from the product
            conn.answer(UNAVAILABLE)
            return
        conn.answer(OK)


def _done(waiter: asyncio.Future[None], error: BaseException | None) -> None:
    if waiter.done():
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)


def serve(port: int, bootstrap: str, blobs: str, layout: str) -> None:
    async def main() -> None:
        server = FloorServer(port, bootstrap, Path(blobs), layout)
        server.producer.send(TOPIC, b"warm").get(30)  # the topic's metadata, once
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: Floor(server), sock=sock, backlog=512)
        await asyncio.Event().wait()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--blob-layout", choices=("packs", "files"), default="packs", help="as [blobs] layout"
    )
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as data:
        for workers in (int(n) for n in args.workers.split(",")):
            port = free_port()
            procs = [
                spawn.Process(
                    target=serve,
                    args=(port, broker.bootstrap, data + "/blobs", args.blob_layout),
                    daemon=True,
                )
                for _ in range(workers)
            ]
            for proc in procs:
                proc.start()
            try:
                if not wait_for_port("127.0.0.1", port, 30):
                    raise SystemExit("the floor server did not start")
                time.sleep(2)

                # Every request a new message (a new blob to write); the warm-up's own.
                def fresh(n: str, port: int = port) -> tuple[str, bytes, dict[str, str]]:
                    return twilio_request(port, n)

                made = [fresh_script(fresh, 60_000, f"{time.time_ns()}{p}") for p in "wm"]
                url = twilio_request(port)[0]
                wrk(url, made[0][0], 2, 64)
                rate, p50, p99, bad = wrk(url, made[1][0], args.seconds, 64)
                for path in (path for pair in made for path in pair):
                    os.unlink(path)
                print(
                    f"floor x{workers}  c=64 {rate:8,.0f} req/s   p50 {p50:6.1f} ms   "
                    f"p99 {p99:6.1f} ms   non-2xx {bad}",
                    flush=True,
                )
            finally:
                for proc in procs:
                    proc.kill()


if __name__ == "__main__":
    main()
