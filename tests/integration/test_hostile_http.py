"""Hostile HTTP traffic against the real uvicorn server: every limit that holds
before authentication or parsing (README, Security, "HTTP: limits before anything
else"). Each test names the attack it replays."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from fastapi import FastAPI, Response
from pydantic import SecretStr

from ingest.postmark import PostmarkAdapter, PostmarkSettings
from ingest.webhook import INLINE_PARSE_BYTES
from normalize.webhook import normalize_webhook
from sinks.agents import AgentStore
from sinks.api import install_denied_handler, queue_router
from sinks.auth import Access
from sinks.queue import QueueStore
from switchboard.blobs import FileBlobStore
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.http import Readiness, create_app
from switchboard.limits import HttpLimitSettings
from switchboard.metrics import HTTP_REFUSED
from switchboard.runtime import HttpServer
from switchboard.settings import KafkaSettings, WebhookSettings
from tests import local_http
from tests.http_helpers import http_ingest

pytestmark = pytest.mark.integration

TOKEN = "hostile-test-token"
STRANGER = "127.0.0.2"  # a second client address on loopback
MB = 1024 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got out before the answer


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _read_answer(sock: socket.socket, sent: int = 0) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without an answer: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    # The first answer only: what follows it in the same read is the next request's.
    if "content-length" in headers:
        body = body[:length]
    return Answer(int(status_line.split()[1]), headers, body, sent)


def _post(
    port: int,
    path: str,
    *,
    total: int,
    chunked: bool,
    declared: int | None = None,
    content_type: str = "application/json",
    source: str = "127.0.0.1",
    first: bytes = b"",
) -> Answer:
    """POST up to ``total`` body bytes (``first``, then filler), stopping as soon as
    the server answers; the answer and how much of the body had been sent."""
    framing = (
        "Transfer-Encoding: chunked"
        if chunked
        else f"Content-Length: {declared if declared is not None else total}"
    )
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
    filler = b" " * 65536
    with _connect(port, source) as sock:
        sock.sendall(head.encode())
        sent = 0
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is in: stop sending
            piece = first or filler
            first = b""
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        return _read_answer(sock, sent)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _until(check: Callable[[], Any], timeout_s: float = 10) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


#: The event loop the servers here run on: asyncio's (a process with the SMTP edge)
#: or uvloop (every other process, switchboard.bootstrap.event_loop_factory).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
_loop = ["asyncio"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs once on each loop: the limits live in uvicorn's protocol
    and our guard around it, which each loop drives through its own transports."""
    _loop[0] = request.param
    yield request.param
    _loop[0] = "asyncio"


@contextmanager
def _serving(app: Any, limits: HttpLimitSettings) -> Iterator[HttpServer]:  # noqa: ANN401
    server = HttpServer(app, "127.0.0.1", 0, limits=limits)
    loop = LOOPS[_loop[0]]()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextmanager
def _queue_api(tmp_path: Path, limits: HttpLimitSettings | None = None) -> Iterator[HttpServer]:
    """The queue API and page over a SQLite store, token required (no broker: no
    request in these tests gets as far as publishing)."""
    limits = limits or HttpLimitSettings()
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade(engine)
    app = create_app(Readiness(), limits)
    store = QueueStore(engine, {"support": ["alice"]})
    access = Access(TOKEN, AgentStore(engine, ["alice"]))
    app.include_router(queue_router(store, FileBlobStore(tmp_path / "blobs"), None, access))
    install_denied_handler(app)
    try:
        with _serving(app, limits) as server:
            yield server
    finally:
        engine.dispose()


def _problem(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = json.loads(answer.body)
    assert document["status"] == status
    return document


def _hook(monkeypatch: pytest.MonkeyPatch, **extra: object) -> WebhookSettings:
    monkeypatch.setenv("HOSTILE_TOKEN", TOKEN)
    return WebhookSettings.model_validate(
        {
            "name": "form",
            "auth": {"kind": "none"},
            "map": {"email": "email", "text": "text"},
            "content_types": ["form"],
            "max_body_bytes": 256 * 1024,
            **extra,
        }
    )


def test_oversized_unauthenticated_api_posts_are_refused_before_they_are_read(
    tmp_path: Path,
) -> None:
    # Attack: 100 MB JSON posts to the queue API without a token, 8 at once, meant
    # to be read whole before the 401 (issue 16: RSS 298 MB -> 1.5 GB).
    path = f"/api/conversations/{uuid.uuid4()}/status"
    with _queue_api(tmp_path) as server:
        declared = _post(server.port, path, total=0, chunked=False, declared=100 * MB)
        assert "65536 bytes" in _problem(declared, 413)["detail"]
        assert declared.headers["connection"] == "close"
        before = _rss_mb()
        with ThreadPoolExecutor(8) as pool:
            streamed = list(
                pool.map(lambda _: _post(server.port, path, total=100 * MB, chunked=True), range(8))
            )
        grew = _rss_mb() - before
        within = local_http.post(
            f"http://127.0.0.1:{server.port}{path}",
            json={"status": "closed"},
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
    for answer in streamed:
        _problem(answer, 413)
        # Refused while streaming: most of the 100 MB was never sent.
        assert answer.sent < 20 * MB, answer.sent
    # 800 MB were offered; what the server kept is nowhere near one body.
    assert grew < 50, f"RSS grew {grew:.0f} MB"
    assert within.status_code == 404  # a small, authorized request still gets through


def test_oversized_and_overfull_login_forms_are_refused(tmp_path: Path) -> None:
    # Attack: POST /queue/login with 100 fields of 1 MB (issue 16: 293 MB -> 990 MB),
    # and a small form of thousands of fields.
    fields = b"&".join(b"f%d=" % n + b"x" * MB for n in range(100))
    with _queue_api(tmp_path) as server:
        declared = _post(
            server.port,
            "/queue/login",
            total=0,
            chunked=False,
            declared=len(fields),
            content_type="application/x-www-form-urlencoded",
        )
        streamed = _post(
            server.port,
            "/queue/login",
            total=len(fields),
            chunked=True,
            content_type="application/x-www-form-urlencoded",
            first=fields[: 2 * MB],
        )
        base = f"http://127.0.0.1:{server.port}/queue/login"
        many = local_http.post(
            base,
            content=b"&".join(b"a%d=" % n for n in range(5000)),
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=30,
        )
        long_field = local_http.post(
            base, data={"name": "admin", "password": "x" * 10_000}, timeout=30
        )
        wrong = local_http.post(base, data={"name": "admin", "password": "not it"}, timeout=30)
        right = local_http.post(
            base, data={"name": "admin", "password": TOKEN}, follow_redirects=False, timeout=30
        )
    _problem(declared, 413)
    # Streamed, whichever limit trips first answers: the body limit (64 KB) when the
    # first read already holds more (asyncio's loop reads 256 KB at a time), else the
    # page form's own field limit (4 KB) as the parser meets the first field (uvloop
    # reads 64 KB). Either way the stream is refused after its first chunks.
    if streamed.status == 400:
        assert "Field exceeded maximum size" in _problem(streamed, 400)["detail"]
    else:
        _problem(streamed, 413)
    assert streamed.sent < 20 * MB, streamed.sent  # of the 100 MB
    assert many.status_code == 400, many.text
    assert "Too many fields" in many.json()["detail"]
    assert long_field.status_code == 400, long_field.text
    assert "maximum size" in long_field.json()["detail"]
    assert wrong.status_code == 401
    assert "do not match" in wrong.text
    assert right.status_code == 303


def test_oversized_hook_posts_are_refused_at_the_hooks_own_limit(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: 100 MB form posts to a public hook, declared and chunked.
    with http_ingest(
        kafka_settings, tmp_path, hooks=[_hook(monkeypatch)], loop_factory=LOOPS[_loop[0]]
    ) as app:
        port = app.server.port
        declared = _post(
            port,
            "/webhooks/form",
            total=0,
            chunked=False,
            declared=100 * MB,
            content_type="application/x-www-form-urlencoded",
        )
        streamed = _post(
            port,
            "/webhooks/form",
            total=100 * MB,
            chunked=True,
            content_type="application/x-www-form-urlencoded",
        )
        fields = local_http.post(
            f"{app.base}/webhooks/form",
            content=b"&".join(b"a%d=" % n for n in range(500)),
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=30,
        )
    # The hook's max_body_bytes (256 KB here), not the 64 KB default.
    assert "262144 bytes" in _problem(declared, 413)["detail"]
    _problem(streamed, 413)
    assert streamed.sent < 20 * MB
    assert fields.status_code == 413, fields.text  # past the hook's max_form_fields
    assert "form fields" in fields.json()["detail"]


FORM = "application/x-www-form-urlencoded"


def _trickle(port: int, source: str, declared: int, sent: bytes = b"") -> socket.socket:
    """A connection from ``source`` that declares a form body of ``declared`` bytes to
    the form hook and sends only ``sent`` of it (then nothing)."""
    sock = _connect(port, source)
    sock.sendall(
        f"POST /webhooks/form HTTP/1.1\r\nHost: t\r\nContent-Type: {FORM}\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return sock


@contextmanager
def _form_hook(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limits: HttpLimitSettings,
) -> Iterator[Any]:
    """The form hook's HTTP ingest with ``limits``, on the loop of this parametrization."""
    with http_ingest(
        kafka_settings,
        tmp_path,
        hooks=[_hook(monkeypatch)],
        limits=limits,
        loop_factory=LOOPS[_loop[0]],
    ) as app:
        yield app


def test_bodies_held_at_once_are_bounded_across_clients(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: many clients, each within its route's body limit and its address's
    # connection cap, together holding bodies the process cannot hold (a provider
    # route takes 50 MB before the signature inside it can be checked). Here the
    # process takes 128 KiB of bodies at once, a client address 32 KiB of it.
    limits = HttpLimitSettings(max_body_in_flight=128 * 1024, body_timeout_s=20)
    form = FORM
    letter = b"email=carol@example.com&text=" + b"x" * 60_000
    held: list[socket.socket] = []
    with _form_hook(kafka_settings, tmp_path, monkeypatch, limits) as app:
        budget = app.server.app.state.body_budget
        port = app.server.port
        url = f"{app.base}/webhooks/form"
        # Headers alone reserve nothing (they did: 19 such connections made every
        # request with a body 503, review of 2026-12-01).
        held += [_trickle(port, "127.0.0.3", 200_000) for _ in range(3)]
        before_bytes = local_http.post(
            url, data={"email": "ann@example.com", "text": "hi"}, timeout=15
        )
        # Four clients hold 30,000 bytes each of 60,000-byte bodies: 120,000 of 131,072.
        held += [
            _trickle(port, f"127.0.0.{4 + n}", 60_000, b"email=" + b"y" * 29_994) for n in range(4)
        ]
        _until(lambda: budget.held == 120_000)
        # A whole body, declared or streamed, past what is left: refused as it arrives.
        declared = _post(
            port,
            "/webhooks/form",
            total=len(letter),
            chunked=False,
            content_type=form,
            source=STRANGER,
            first=letter,
        )
        streamed = _post(
            port,
            "/webhooks/form",
            total=200 * 1024,
            chunked=True,
            content_type=form,
            source=STRANGER,
        )
        # A small message still fits beside them...
        small = local_http.post(url, data={"email": "ann@example.com", "text": "hi"}, timeout=15)
        # ... but not from an address that already holds its quarter.
        greedy = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"))
        second = greedy.post(url, data={"email": "bo@example.com", "text": "z" * 3000}, timeout=15)
        greedy.close()
        held_meanwhile = budget.held
        for sock in held:
            sock.close()  # gone mid-body: what they held is given back
        _until(lambda: budget.held == 0 and not budget.clients)
        again = local_http.post(url, content=letter, headers={"content-type": form}, timeout=15)
    assert before_bytes.status_code == 202, before_bytes.text
    busy = _problem(declared, 503)
    assert declared.headers["retry-after"] == "1"
    assert declared.headers["connection"] == "close"
    assert "retry shortly" in busy["detail"]
    _problem(streamed, 503)  # under the hook's own limit (256 KiB): only the budget refuses it
    assert small.status_code == 202, small.text
    assert second.status_code == 503, second.text
    assert held_meanwhile == 120_000  # every answered request gave its bytes back
    assert again.status_code == 202, again.text


def test_an_addresss_only_request_grows_to_its_routes_limit_beside_others(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by a review (2026-12-01): a body past its address's quarter of the budget
    # was refused whenever anyone else held a byte. On a 4-core host a worker's
    # quarter is 32 MB, under Mailgun's 30-50 MB routes: a provider's large mail was
    # refused for as long as any other request was being read (and one stranger
    # trickling a body kept it so). Here the budget is 256 KiB, a quarter 64 KiB.
    limits = HttpLimitSettings(max_body_in_flight=256 * 1024, body_timeout_s=20)
    # 150 KB in fields of at most the form's 64 KiB each.
    letter = b"email=carol@example.com&text=" + b"&".join(
        [b"x" * 50_000, b"a=" + b"x" * 50_000, b"b=" + b"x" * 50_000]
    )
    with _form_hook(kafka_settings, tmp_path, monkeypatch, limits) as app:
        budget = app.server.app.state.body_budget
        url = f"{app.base}/webhooks/form"
        port = app.server.port
        with _trickle(port, "127.0.0.3", 60_000, b"email=" + b"y" * 994):
            _until(lambda: budget.held == 1000)
            large = local_http.post(url, content=letter, headers={"content-type": FORM}, timeout=15)
            # A second request of an address that holds bytes is bound by the quarter.
            with _trickle(port, "127.0.0.4", 200_000, b"email=" + b"z" * 59_994):
                _until(lambda: budget.held == 61_000)
                greedy = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"))
                second = greedy.post(
                    url, content=letter, headers={"content-type": FORM}, timeout=15
                )
                greedy.close()
    assert large.status_code == 202, large.text
    assert second.status_code == 503, second.text


def test_a_slow_body_gets_408(tmp_path: Path) -> None:
    # Attack: a body trickled in (10 of 100 declared bytes, then nothing) to hold a
    # request open.
    limits = HttpLimitSettings(body_timeout_s=0.5)
    with _queue_api(tmp_path, limits) as server, _connect(server.port) as sock:
        sock.sendall(
            b"POST /queue/login HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
            b"token=abcd"
        )
        answer = _read_answer(sock)
        assert sock.recv(1) == b""  # and the connection is closed
    assert "did not arrive within" in _problem(answer, 408)["detail"]


def test_a_body_in_pieces_within_the_deadline_is_read_whole(tmp_path: Path) -> None:
    # The other side of the 408: a body whose second half arrives later, but within
    # the deadline, is read whole (the receive that waits gets the deadline's timer;
    # one that finds the body there does not need it).
    limits = HttpLimitSettings(body_timeout_s=2)
    with _queue_api(tmp_path, limits) as server, _connect(server.port) as sock:
        body = b"name=alice&password=" + b"w" * 80  # wrong: the page answers, not a limit
        sock.sendall(
            b"POST /queue/login HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
            + body[:10]
        )
        time.sleep(0.5)
        sock.sendall(body[10:])
        answer = _read_answer(sock)
    # 401, the password checked: it is in the second piece (422 names a missing field).
    assert answer.status == 401, (answer.status, answer.body[:300])


def test_one_address_cannot_hold_every_connection(tmp_path: Path) -> None:
    # Attack: a stranger opens connections up to (and past) the limit and keeps them
    # open sending nothing, to starve everyone else.
    limits = HttpLimitSettings(max_connections_per_client=4, header_timeout_s=30)
    with _queue_api(tmp_path, limits) as server:
        held = [_connect(server.port, STRANGER) for _ in range(4)]
        try:
            _until(lambda: server.guard.open.get(STRANGER) == 4)
            with _connect(server.port, STRANGER) as extra:
                refused = _read_answer(extra)
                assert extra.recv(1) == b""
            health = local_http.get(f"http://127.0.0.1:{server.port}/healthz", timeout=30)
            # The stranger's held connections still work (they are within its limit).
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            own = _read_answer(held[0])
        finally:
            for sock in held:
                sock.close()
        _until(lambda: STRANGER not in server.guard.open)
    assert refused.status == 429
    assert refused.headers["retry-after"] == "1"
    assert health.status_code == 200
    assert own.status == 200


def test_slowloris_headers_are_cut_off(tmp_path: Path) -> None:
    # Attack: slowloris, the request line and headers one byte at a time, so the
    # connection never becomes a request and never times out.
    limits = HttpLimitSettings(header_timeout_s=0.5)
    with _queue_api(tmp_path, limits) as server:
        with _connect(server.port, STRANGER) as sock:
            closed = False
            deadline = time.monotonic() + 10
            for byte in b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 1000:
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if select.select([sock], [], [], 0.05)[0]:
                    try:
                        closed = sock.recv(1) == b""
                    except ConnectionResetError:  # closed with our bytes unread
                        closed = True
                    break
                assert time.monotonic() < deadline, "still open after 10 s"
        assert closed
        _until(lambda: STRANGER not in server.guard.open)
        # A whole request sent at once is unaffected, on a connection that was
        # idle for longer than the header deadline first.
        with _connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            first = _read_answer(sock)
            time.sleep(0.2)  # kept alive, within uvicorn's keep-alive timeout
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            second = _read_answer(sock)
    assert first.status == 200
    assert second.status == 200


def _header_flood(sock: socket.socket) -> tuple[Answer, int]:
    """A header without end, until the server answers; the answer and the bytes sent.
    16 MB offered: more than the loopback buffers hold, so the client cannot be done
    before the server has read past its limit and answered."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: ")
    sent = 0
    while sent < 16 * MB:
        if select.select([sock], [], [], 0)[0]:
            break  # the answer is in: stop sending
        sock.sendall(b"a" * 16384)
        sent += 16384
    return _read_answer(sock), sent


def test_a_header_flood_is_cut_off_at_the_header_limit(tmp_path: Path) -> None:
    # Attack: headers without end, megabytes and counting, on one connection (httptools
    # kept every byte: 8 such connections of 50 MB took the server from 217 to 626 MB).
    limits = HttpLimitSettings(max_header_bytes=64 * 1024)
    with _queue_api(tmp_path, limits) as server:
        with _connect(server.port, STRANGER) as sock:
            refused, sent = _header_flood(sock)
            assert sock.recv(1) == b""  # the server ended its side after the answer
        assert sent < 16 * MB  # answered on the way, not after the client was done
        # Headers under the limit, and a body far over it sent in the same write as
        # its headers, are requests like any other.
        with _connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n")
            fine = _read_answer(sock)
        body = b"x" * (200 * 1024)
        with _connect(server.port) as sock:
            sock.sendall(
                b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            with_body = _read_answer(sock)
    assert refused.status == 431
    assert fine.status == 200
    assert with_body.status != 431


def _refused(reason: str) -> float:
    return HTTP_REFUSED.labels(reason)._value.get()  # type: ignore[no-any-return]


def _until_closed(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    got = b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _chunk(piece: bytes) -> bytes:
    return f"{len(piece):x}\r\n".encode() + piece + b"\r\n"


def _answered_early(sock: socket.socket) -> Answer:
    """A chunked POST to a path that does not exist, its first chunk sent: the 404
    comes before the body is read, and the body stays open."""
    sock.sendall(
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(b"x")
    )
    return _read_answer(sock)


def test_an_early_answer_is_the_only_one_while_its_body_streams_on(tmp_path: Path) -> None:
    # Attack (and any client that sends its body before reading the answer): a
    # request answered before its body was read (here a 404) while megabytes of body
    # follow. The guard took those bytes for the next request's headers and, 64 KB
    # later, sent a second answer, 431, that no request had asked for.
    before = _refused("body-after-answer")
    limits = HttpLimitSettings(header_timeout_s=60)  # the bound on bytes must do it
    with _queue_api(tmp_path, limits) as server, _connect(server.port, STRANGER) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        closed = False
        got = b""
        while not closed and time.monotonic() - started < 20:
            try:
                sock.sendall(_chunk(b" " * 16384))
                # Read as it comes: bytes unread when the reset arrives are lost.
                while not closed and select.select([sock], [], [], 0)[0]:
                    chunk = sock.recv(65536)
                    got += chunk
                    closed = not chunk
            except (BrokenPipeError, ConnectionResetError):
                closed = True  # by the server, a second after the bound was passed
        got += _until_closed(sock, 10) if not closed else b""
    assert closed, "the server still read an answered request's body after 20 s"
    assert time.monotonic() - started < 10  # closed by the bound, not a deadline
    answers = re.findall(rb"HTTP/1\.1 \d{3}", got)  # a second one follows a body directly
    assert answers == [b"HTTP/1.1 404"], got[:400]
    assert _refused("body-after-answer") == before + 1


def test_after_an_early_answer_the_rest_of_a_small_body_passes(tmp_path: Path) -> None:
    # What the bound must not break: a client that sends a whole modest body before
    # reading its answer, then its next request on the same connection; and a
    # header flood on that kept-alive connection is still cut off at the header limit.
    limits = HttpLimitSettings(max_header_bytes=8192)
    # Over the header limit, under the route's body limit (64 KB: a longer one is
    # refused by its length, and closed) and the bound on dropped bytes.
    body = b" " * (48 * 1024)
    with _queue_api(tmp_path, limits) as server, _connect(server.port) as sock:
        sock.sendall(
            b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body[:1024]
        )
        answered = _read_answer(sock)
        for start in range(1024, len(body), 16384):  # the rest, after the answer
            sock.sendall(body[start : start + 16384])
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        next_request = _read_answer(sock)
        flood, sent = _header_flood(sock)
    assert answered.status == 404
    assert next_request.status == 200
    assert flood.status == 431
    assert sent < 16 * MB


def test_the_rest_of_an_answered_body_must_come_in_time(tmp_path: Path) -> None:
    # Attack: after an early answer, the body's rest a byte at a time, which the
    # dropped-bytes bound would take hours to reach; the header deadline runs from
    # its first byte instead.
    limits = HttpLimitSettings(header_timeout_s=0.5)
    before = _refused("body-after-answer")
    with _queue_api(tmp_path, limits) as server, _connect(server.port, STRANGER) as sock:
        answered = _answered_early(sock)
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 10:
            try:
                sock.sendall(_chunk(b"x"))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0.05)[0]:
                closed = _until_closed(sock, 1) == b""
        took = time.monotonic() - started
    assert answered.status == 404
    assert took < 5, f"still open after {took:.1f} s"
    assert _refused("body-after-answer") == before + 1


def test_the_rest_of_an_answered_body_counts_only_its_own_bytes(tmp_path: Path) -> None:
    # Nearly the whole bound of dropped body, its end and the next request in one
    # write: the next request is answered (the request's bytes are not the body's).
    with _queue_api(tmp_path) as server, _connect(server.port) as sock:
        answered = _answered_early(sock)
        # Exactly the bound (256 KB), framing and the next request on top.
        rest = b"".join(_chunk(b" " * 16384) for _ in range(16))
        sock.sendall(rest + b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        following = _read_answer(sock)
    assert answered.status == 404
    assert following.status == 200


def test_an_early_answer_to_expect_100_continue_closes(tmp_path: Path) -> None:
    # A client that waits for "100 Continue" and gets 404 instead sends no body: its
    # next request would have been read as that body (and answered 400 as garbage).
    with _queue_api(tmp_path) as server, _connect(server.port) as sock:
        sock.sendall(
            b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        answered = _read_answer(sock)
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        rest = _until_closed(sock, 10)
    assert answered.status == 404
    assert answered.headers["connection"] == "close"  # it said so, with the answer
    assert rest == b""  # closed; no 400 for a "body" that was the next request


def test_broken_framing_after_an_early_answer_gets_no_second_answer(tmp_path: Path) -> None:
    with _queue_api(tmp_path) as server, _connect(server.port) as sock:
        answered = _answered_early(sock)
        sock.sendall(b"zz\r\n")  # not a chunk size
        rest = _until_closed(sock, 10)
    assert answered.status == 404
    assert rest == b""


@pytest.mark.parametrize("trailers", ["many", "one long"])
def test_trailers_are_bounded_like_headers(tmp_path: Path, trailers: str) -> None:
    # Attack: a body's last chunk, then trailers without end while the route waits
    # for the body's end: uvicorn keeps every trailer, and one connection took a
    # server from 234 MB to 1.9 GB in 5 s (attacker review, 2026-12-03).
    limits = HttpLimitSettings(max_header_bytes=8192, body_timeout_s=60)
    path = f"/api/conversations/{uuid.uuid4()}/status"
    before = _refused("header-size")
    with _queue_api(tmp_path, limits) as server, _connect(server.port, STRANGER) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + _chunk(b'{"status": "closed"}')
            + b"0\r\n"
            + (b"X-T: " if trailers == "one long" else b"")
        )
        line = b"X-T: " + b"a" * 90 + b"\r\n" if trailers == "many" else b"a" * 1024
        sent = 0
        try:
            while sent < 16 * MB:
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer is in: stop sending
                sock.sendall(line * 16)
                sent += len(line) * 16
        except (BrokenPipeError, ConnectionResetError):
            pass
        refused = _read_answer(sock)
    assert sent < 16 * MB, "16 MB of trailers read"
    assert refused.status == 431  # the request's own answer: it had none yet
    assert _refused("header-size") == before + 1


def test_a_websocket_upgrade_gives_its_connection_slot_back(tmp_path: Path) -> None:
    # Attack: upgrade requests. uvicorn handed an upgraded connection to its websocket
    # protocol, the guard never saw it close, and each one kept a slot of its address
    # for good: a few of them locked the address (a whole NAT) out.
    limits = HttpLimitSettings(max_connections_per_client=3)
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with _queue_api(tmp_path, limits) as server:
        answers = []
        for _ in range(5):
            with _connect(server.port, STRANGER) as sock:
                sock.sendall(upgrade)
                answers.append(_read_answer(sock).status)
        _until(lambda: STRANGER not in server.guard.open)
        with _connect(server.port, STRANGER) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            after = _read_answer(sock)
    assert 101 not in answers
    assert 429 not in answers
    assert after.status == 200


def test_a_header_flood_behind_a_pipelined_answer_is_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Attack: requests pipelined faster than their answers are read, so an answer is
    # always on its way, then a header without end: those header bytes were counted
    # only once no answer was pending, and 150 MB went in (attacker review).
    limits = HttpLimitSettings(max_header_bytes=8192, header_timeout_s=60)
    before = _refused("header-size")
    with _queue_api(tmp_path, limits) as server, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        sock.bind((STRANGER, 0))
        sock.connect(("127.0.0.1", server.port))
        # Within MAX_PIPELINED: more are refused at once (the test after this one).
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n" * 30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: ")
        sock.settimeout(20)
        closed = False
        started = time.monotonic()
        try:
            while time.monotonic() - started < 20:
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        except TimeoutError:
            pass  # no longer read, and not closed either
    assert closed, "the header flood was neither refused nor closed in 20 s"
    assert _refused("header-size") == before + 1
    # The answers still being written when it closed went nowhere, quietly (one
    # written after our end of the connection was shut raised in the app).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_pipelined_requests_are_bounded(tmp_path: Path) -> None:
    # Attack: one write of thousands of tiny requests. uvicorn parsed and queued them
    # all (one connection: 1.2 million queued, 3 GB, never closed; attacker review).
    before = _refused("pipelined")
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with _queue_api(tmp_path) as server:
        with _connect(server.port) as sock:
            sock.sendall(request * 20)  # a pipelining client within the bound
            fine = _answers(sock, 20)
        with _connect(server.port, STRANGER) as sock:
            with suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request * 5000)
            flood = _until_closed(sock, 10)
        _until(lambda: STRANGER not in server.guard.open)
    assert fine.count(b"HTTP/1.1 200") == 20
    assert flood.count(b"HTTP/1.1 200") < 100
    assert _refused("pipelined") == before + 1


def _answers(sock: socket.socket, count: int) -> bytes:
    """What the server sends until it has begun ``count`` answers, or closes."""
    got = b""
    sock.settimeout(10)
    while got.count(b"HTTP/1.1 ") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_a_client_that_takes_no_answer_is_closed_at_the_send_timeout(tmp_path: Path) -> None:
    # Attack: ask for answers and never read them: uvicorn waited for the client to
    # take them without a bound, holding the connection and its slot.
    limits = HttpLimitSettings(send_timeout_s=1)
    before = _refused("send-timeout")
    with _queue_api(tmp_path, limits) as server, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        sock.bind((STRANGER, 0))
        sock.connect(("127.0.0.1", server.port))
        started = time.monotonic()
        with suppress(BrokenPipeError, ConnectionResetError):
            # One request at a time, until the kernel's buffers are full and the
            # answers wait in the server (uvicorn stops reading meanwhile).
            while _refused("send-timeout") == before and time.monotonic() - started < 15:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                time.sleep(0.02)
        _until(lambda: STRANGER not in server.guard.open)
    assert _refused("send-timeout") == before + 1


def test_an_upgrade_request_with_a_body_is_answered_and_closed(tmp_path: Path) -> None:
    # httptools skips the body of an upgrade request (curl --http2 -d sends one): it
    # was read as a next request and answered 400; the connection now closes after
    # the answer. An upgrade probe without a body (curl's h2c) keeps its connection.
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    with _queue_api(tmp_path) as server:
        with _connect(server.port) as sock:
            sock.sendall(
                b"POST /nope HTTP/1.1\r\nHost: t\r\n" + upgrade + b"Content-Length: 5\r\n\r\nhello"
            )
            with_body = _read_answer(sock)
            rest = _until_closed(sock, 10)
        with _connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + upgrade + b"\r\n")
            probe = _read_answer(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            reused = _read_answer(sock)
    assert with_body.status == 404
    assert with_body.headers["connection"] == "close"
    assert rest == b""  # no 400 for its body taken as a request
    assert probe.status == 200
    assert "connection" not in probe.headers
    assert reused.status == 200


def _big_answer_app() -> Any:  # noqa: ANN401
    app = FastAPI()

    @app.get("/big")
    def big() -> Response:
        return Response(b"x" * (8 * MB))  # as the queue API answers an attachment

    return app


def test_a_slow_reader_is_not_cut_and_a_gone_one_is(tmp_path: Path) -> None:
    # The send timeout is on time without progress, as nginx's send_timeout: a client
    # that takes 8 MB slowly is served for as long as it takes; one that
    # takes nothing is closed, also when the answer is complete and uvicorn's close()
    # waits for it (Connection: close), where it held the connection for good.
    limits = HttpLimitSettings(send_timeout_s=1)
    before = _refused("send-timeout")
    with _serving(_big_answer_app(), limits) as server:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            got = 0
            started = time.monotonic()
            sock.settimeout(10)
            while got < 8 * MB and time.monotonic() - started < 60:
                chunk = sock.recv(16384)  # a few KB each: the receive buffer is small
                if not chunk:
                    break
                got += len(chunk)
                time.sleep(0.004)  # 8 MB in 10-20 s, ten times the send timeout and more
        slow = got
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((STRANGER, 0))
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            _until(lambda: _refused("send-timeout") == before + 1, timeout_s=15)
            _until(lambda: STRANGER not in server.guard.open)
    assert slow > 8 * MB  # the whole answer and its head
    assert _refused("send-timeout") == before + 1  # the gone one only


def test_chunk_framing_after_an_early_answer_counts_against_the_bound(tmp_path: Path) -> None:
    # Attack: after an early answer, chunk extensions without end and no body byte:
    # they held no memory, but took a core for the whole header deadline.
    limits = HttpLimitSettings(header_timeout_s=60)
    with _queue_api(tmp_path, limits) as server, _connect(server.port, STRANGER) as sock:
        answered = _answered_early(sock)
        started = time.monotonic()
        closed = False
        with suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 20:  # 1-byte chunks, 60 KB extensions
                sock.sendall(b"1;" + b"e" * 60000 + b"\r\n \r\n")
        closed = True
        took = time.monotonic() - started
    assert answered.status == 404
    assert closed
    assert took < 10, f"read for {took:.1f} s"


def test_junk_from_one_client_does_not_cost_another_its_submissions(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: a flood of junk text/plain posts (and then real-looking forms) from one
    # address at a public form hook; issue 16 saw every real submission get 429.
    hook = _hook(monkeypatch, rate_per_s=0.001, burst=20, client_rate_per_s=0.001, client_burst=10)
    with http_ingest(kafka_settings, tmp_path, hooks=[hook], loop_factory=LOOPS[_loop[0]]) as app:
        url = f"{app.base}/webhooks/form"
        stranger = httpx.Client(transport=httpx.HTTPTransport(local_address=STRANGER), timeout=30)
        junk = [
            stranger.post(url, content=b"junk", headers={"content-type": "text/plain"}).status_code
            for _ in range(100)
        ]
        forms = [
            stranger.post(url, data={"email": "eve@example.org", "text": f"spam {n}"}).status_code
            for n in range(30)
        ]
        stranger.close()
        real = [
            local_http.post(
                url, data={"email": f"ann{n}@example.com", "text": "hello"}, timeout=15
            ).status_code
            for n in range(10)
        ]
    assert set(junk) == {415}
    assert forms[:10] == [202] * 10
    assert set(forms[10:]) == {429}  # its own limit, not the hook's
    assert real == [202] * 10


def test_x_forwarded_for_only_from_a_trusted_proxy(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: a client rotating X-Forwarded-For to look like many clients and dodge
    # its per-client limit. Only 127.0.0.1 is a trusted proxy here.
    # An open hook: accepted (202) while the client is within its limit, 429 after.
    # (A wrong bearer token is refused before any limit is charged, from the headers.)
    hook = _hook(monkeypatch, client_rate_per_s=0.001, client_burst=2)
    limits = HttpLimitSettings(trusted_proxies=["127.0.0.1/32"])
    form = {"email": "eve@example.org", "text": "x"}
    with http_ingest(
        kafka_settings, tmp_path, hooks=[hook], limits=limits, loop_factory=LOOPS[_loop[0]]
    ) as app:
        url = f"{app.base}/webhooks/form"
        stranger = httpx.Client(transport=httpx.HTTPTransport(local_address=STRANGER), timeout=30)
        spoofed = [
            stranger.post(
                url, data=form, headers={"x-forwarded-for": f"198.51.100.{n}"}
            ).status_code
            for n in range(4)
        ]
        stranger.close()

        def via_proxy(client: str) -> int:
            headers = {"x-forwarded-for": f"{client}, 127.0.0.1"}
            return local_http.post(url, data=form, headers=headers, timeout=30).status_code

        first = [via_proxy("203.0.113.7") for _ in range(3)]
        second = via_proxy("203.0.113.8")
    assert spoofed == [202, 202, 429, 429]  # all one client: 127.0.0.2
    assert first == [202, 202, 429]  # the proxy's client 203.0.113.7 is limited...
    assert second == 202  # ...and 203.0.113.8 is another client


def test_a_provider_refuses_missing_credentials_before_reading_the_body(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    # Attack: 40 MB posts to the Postmark route (50 MB allowed) without credentials:
    # each was read whole and only then refused (24 at once: +1.25 GB).
    providers = [(PostmarkAdapter, PostmarkSettings(password=SecretStr("pm-secret")))]
    with http_ingest(kafka_settings, tmp_path, providers=providers) as app:
        port = app.server.port
        answer = _post(port, "/webhooks/postmark", total=40 * MB, chunked=False)
    assert answer.status == 401
    assert answer.sent < 20 * MB, answer.sent


def test_unsigned_junk_does_not_spend_a_signed_hooks_budget(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: a stranger posts junk with a made-up signature to a signed hook, at its
    # rate limit, so the backend's real (signed) requests get 429.
    hook = _hook(
        monkeypatch,
        auth={"kind": "hmac-sha256", "secret_env": "HOSTILE_TOKEN", "allow_replay": True},
        rate_per_s=0.001,
        burst=2,
        client_rate_per_s=0.001,
        client_burst=10,
    )
    with (
        http_ingest(kafka_settings, tmp_path, hooks=[hook]) as app,
        httpx.Client(transport=httpx.HTTPTransport(local_address=STRANGER), timeout=30) as stranger,
    ):
        url = f"{app.base}/webhooks/form"
        form = "email=ann%40example.org&text=hello"
        junk = [
            stranger.post(
                url, content=form, headers={**FORM_TYPE, "x-signature": "00" * 32}
            ).status_code
            for _ in range(6)
        ]
        signature = hmac.new(TOKEN.encode(), form.encode(), hashlib.sha256).hexdigest()
        signed = [
            local_http.post(
                url, content=form, headers={**FORM_TYPE, "x-signature": signature}, timeout=30
            ).status_code
            for _ in range(3)
        ]
    assert junk == [403] * 6
    assert signed == [202, 202, 429]  # the hook's own budget, spent by signed requests only


FORM_TYPE = {"content-type": "application/x-www-form-urlencoded"}


def test_password_checks_run_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: failed sign-ins in a loop. Each is an Argon2 check (64 MiB, tens of ms);
    # on the event loop they held every other request of the server behind them.
    on_loop: list[bool] = []
    check = AgentStore.check_password

    def recording(self: AgentStore, name: str, password: str) -> bool:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return check(self, name, password)

    monkeypatch.setattr(AgentStore, "check_password", recording)
    with _queue_api(tmp_path) as server:
        base = f"http://127.0.0.1:{server.port}/queue/login"
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda n: (
                        local_http.post(
                            base, data={"name": "alice", "password": f"guess{n}"}, timeout=30
                        ).status_code
                    ),
                    range(4),
                )
            )
    assert set(answers) <= {401, 429}
    assert on_loop
    assert not any(on_loop)


def _large_document(n: int) -> bytes:
    """A valid JSON document of about 1 MB under every limit: 80,000 small keys."""
    return json.dumps(
        {"email": f"big{n}@example.org", "text": "hi", **{f"k{i}": n for i in range(80_000)}}
    ).encode()


def test_a_large_json_document_is_mapped_off_the_event_loop(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: a public JSON hook's 1 MB document of 80,000 small keys, valid and under
    # every limit; its walks (shape check, stripping controls, mapping) took 0.1-0.3 s
    # of the event loop each, and every other request of the server waited behind it.
    small_answered = threading.Event()
    seen: list[tuple[int, bool]] = []
    normalize = normalize_webhook

    def watched(payload: Any, ctx: Any) -> Any:  # noqa: ANN401 - the normalizer's own
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((len(payload), on_loop))
        if len(payload) > 1000:
            # Held until a small post was answered meanwhile: on the loop this waits
            # out its 20 s and the small post (the loop blocked) is never answered.
            small_answered.wait(20)
        return normalize(payload, ctx)

    monkeypatch.setattr("ingest.webhook.normalize_webhook", watched)
    hook = _hook(monkeypatch, content_types=["json"], max_body_bytes=MB + 1)
    body = _large_document(1)
    assert INLINE_PARSE_BYTES < len(body) <= MB
    with http_ingest(kafka_settings, tmp_path, hooks=[hook], loop_factory=LOOPS[_loop[0]]) as app:
        url = f"{app.base}/webhooks/form"
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(
                local_http.post,
                url,
                content=body,
                headers={"content-type": "application/json"},
                timeout=60,
            )
            while not any(size > 1000 for size, _ in seen) and not big.done():
                time.sleep(0.01)
            small = local_http.post(
                url, json={"email": "ann@example.com", "text": "hi"}, timeout=10
            )
            small_answered.set()
            assert small.status_code == 202, small.text
            assert big.result().status_code == 202, big.result().text
    assert sorted(seen) == [(2, True), (80_002, False)]


def test_large_documents_waiting_for_the_parse_are_bounded(
    kafka_settings: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: strangers post large documents faster than the parse thread maps them;
    # queued, they held the process's whole body budget (review, 2026-12-02). A hook
    # holds at most 4 MB of them at once (the one parsed included); past it, 503.
    release = threading.Event()
    normalize = normalize_webhook

    def held(payload: Any, ctx: Any) -> Any:  # noqa: ANN401 - the normalizer's own
        release.wait(30)
        return normalize(payload, ctx)

    monkeypatch.setattr("ingest.webhook.normalize_webhook", held)
    hook = _hook(monkeypatch, content_types=["json"], max_body_bytes=MB + 1)
    documents = [_large_document(n) for n in range(6)]
    assert all(MB * 0.9 < len(d) <= MB for d in documents)  # four fit in 4 MB, five not
    with http_ingest(kafka_settings, tmp_path, hooks=[hook], loop_factory=LOOPS[_loop[0]]) as app:
        url = f"{app.base}/webhooks/form"
        with ThreadPoolExecutor(6) as pool:
            posts = [
                pool.submit(
                    local_http.post,
                    url,
                    content=d,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
                for d in documents
            ]
            deadline = time.monotonic() + 30
            while sum(p.done() for p in posts) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            early = [p.result() for p in posts if p.done()]
            release.set()
            answers = [p.result() for p in posts]
    assert [r.status_code for r in early] == [503, 503]
    assert all(r.headers["retry-after"] == "1" for r in early)
    assert sorted(r.status_code for r in answers) == [202, 202, 202, 202, 503, 503]
