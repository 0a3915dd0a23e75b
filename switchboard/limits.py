"""HTTP limits that hold before any route runs: body size, body time, connections.

A stranger can reach every HTTP route without a token, so nothing that costs
memory or a connection slot may wait for authentication or parsing:

- :class:`BodyLimitMiddleware` (pure ASGI, outermost in the app) answers 413 as
  soon as ``Content-Length`` or the bytes streamed so far pass the route's limit,
  and 408 when the body is not in within ``body_timeout_s``. It never buffers:
  it counts the chunks it passes on.
- :class:`BodyBudget` bounds the body bytes all requests of a process hold at once
  (503 past it): per-route limits and per-client connection caps alone let many
  clients together hold any amount.
- :class:`BodyLimits` is the one table of per-route limits. HTTP adapters
  register each route's ``max_body_bytes`` when mounted; every other route (the
  queue API and page) gets the default.
- :func:`guarded_protocol` wraps uvicorn's HTTP protocol class: at most
  ``max_connections_per_client`` open connections per peer address, and a
  deadline for the request line and headers, which uvicorn does not have
  (its keep-alive timer is cancelled by the first byte of a request).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import inspect
import ipaddress
import json
import logging
import sys
import termios
import time
from collections.abc import Awaitable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.metrics import HTTP_REFUSED

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_memory_field(what: str) -> Any:  # noqa: ANN401 - a pydantic FieldInfo
    """The ``parse_memory_mb`` setting of every section with parse processes (SMTP,
    IMAP, the HTTP providers' mail; ``what`` their word for one input)."""
    return Field(
        default=1024,
        ge=0,
        le=1048576,
        description=(
            f"Address space each parse process may take, in MiB (0: unbounded). A {what} "
            "that needs more is kept as a dead letter (normalizer-error) and the process "
            "goes on (native code that runs out aborts it: a crash, tried once more); a "
            "25 MB mail of attachments or text needed 250-320 here, one of header lines "
            "or HTML 855-923."
        ),
    )


class HttpLimitSettings(BaseSettings):
    """Limits of the HTTP server that hold for every route ([http] in the file)."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_HTTP_", extra="ignore")

    max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description=(
            "Largest body of a route without a limit of its own: the queue API (/api/...) "
            "and page (/queue...). Hooks and providers have their own max_body_bytes."
        ),
    )
    body_timeout_s: float = Field(
        default=15.0, gt=0, le=600, description="Longest a request body may take to arrive (408)."
    )
    send_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest a connection may go without taking any of an answer the "
        "server is writing to it (nginx's send_timeout); then it is closed.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Longest the request line and headers may take to arrive; then the "
        "connection is closed.",
    )
    max_connections_per_client: int = Field(
        default=64,
        ge=1,
        description="Open connections one client address (an IPv6 client: its /64) may "
        "hold; more are answered 429 and closed. Trusted proxies are exempt.",
    )
    max_body_in_flight: int = Field(
        default=512 * 1024 * 1024,
        ge=64 * 1024,
        description=(
            "Body bytes all requests being served may hold at once (divided among "
            "--workers), counted as the bytes arrive; a body that would pass it, or pass a "
            "quarter of it held by one client address (an address's only request: its route's "
            "limit), is answered 503 with Retry-After. "
            "One request always fits when nothing else is held."
        ),
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=4096,
        description="Most bytes of request line and headers one request may send; past "
        "them 431 and the connection is closed.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Processes serving the port in `switchboard ingest http` (also --workers); "
            "default one per CPU core. `switchboard run` always runs one."
        ),
    )
    parse_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description=(
            "Processes beside each HTTP process that parse the providers' mail (Mailgun, "
            "SendGrid, Postmark), started only when one of them is enabled; 0: a thread "
            "of the HTTP process, which nothing can stop."
        ),
    )
    parse_timeout_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description=(
            "A parse process still busy with one mail after this long is killed and "
            "replaced; the mail is tried once more (after the mail waiting), then kept as "
            "a dead letter (normalizer-error)."
        ),
    )
    parse_memory_mb: int = parse_memory_field("mail")
    # Loopback by default, as uvicorn's own default: a proxy on the same host must
    # keep working, and the queue API's "loopback only without a token" rule must
    # see the proxy's client, not the proxy.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description=(
            "Addresses or CIDRs of reverse proxies whose X-Forwarded-For names the client, "
            "comma-separated (10.0.0.0/8,192.168.1.10); default loopback. Empty: the "
            "header is ignored from everyone."
        ),
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an address or CIDR: {item!r}") from exc
        return value

    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(item, strict=False) for item in self.trusted_proxies)


def share(limit: int, workers: int) -> int:
    """One worker's part of a limit the processes on one port share (``--workers``):
    never more in sum than ``limit`` (unless ``limit`` is smaller than the number of
    workers: at least 1 each), and 0 stays 0 (where 0 means "none")."""
    return 0 if limit <= 0 else max(1, limit // max(1, workers))


@functools.lru_cache(maxsize=4096)
def client_key(host: str | None) -> str:
    """The address a client is limited by: itself for IPv4, its /64 for IPv6 (one
    customer's line gets a whole /64; limiting single addresses would be no limit).

    Cached: each request asked twice (its body budget, its hook's rate limit), and
    parsing the address was 4% of a JSON hook's time in `bench/request_cost.py`'s
    profile (2026-12-01). A stranger rotating addresses only misses the cache."""
    if not host:
        return ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def trusted(host: str | None, networks: Sequence[Network]) -> bool:
    """Whether ``host`` (a peer address) is one of ``networks``."""
    if not host or not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


class BodyBudget:
    """The body bytes every request of this process holds at once, bounded, and the
    part of them one client address (an IPv6 client: its /64) may hold.

    A request is charged the body bytes it has received, chunk by chunk, and gives
    them back when the app has answered (the app holds the body until then: Kafka's
    acknowledgement comes before the answer). Only bytes that arrived count: a
    declared ``Content-Length`` reserved its size before any byte came until a
    review on 2026-12-01 found that nineteen connections sending headers alone
    (``Content-Length: 29000000`` to the Mailgun route) made every other request
    with a body 503 for free. Route limits and the connection cap bound one request
    and one client's connections; this bounds all of them together (a provider
    route takes 50 MB before its signature, which is inside the body, can be
    checked), and ``per_client`` (a quarter by default) keeps one address from
    holding all of it: an address's only request may grow to its route's limit.
    A request always fits when nothing but itself is held (in all, and by its
    client), so a route limit above the budget still works, one request at a time.
    """

    def __init__(self, limit: int, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client or max(1, limit // 4)
        self.held = 0
        self.clients: dict[str, int] = {}

    def take(self, size: int, client: str = "", own: int = 0, route_limit: int = 0) -> bool:
        """Room for ``size`` more bytes of a request from ``client`` that holds
        ``own`` bytes already, on a route that takes ``route_limit`` bytes; taken
        when True."""
        mine = self.clients.get(client, 0)
        share = self.per_client
        if mine == own and route_limit > share:
            # The address's only request may grow to its route's limit: the route's
            # limit says one such body is legitimate. Bound by the quarter alone, a
            # provider's 30-50 MB mail was refused on a worker of a 4-core host (a
            # 32 MB quarter) whenever any other request held a byte (review,
            # 2026-12-01). A second request of the same address is bound by the
            # quarter, with the first (an earlier review: one address's requests
            # together held most of a worker's budget).
            share = route_limit
        if self.held > own and (self.held + size > self.limit or mine + size > share):
            # Others hold bytes: the budget, and this address's share of it, bound it.
            return False
        self.held += size
        self.clients[client] = mine + size
        return True

    def give(self, size: int, client: str = "") -> None:
        if not size:
            return
        self.held -= size
        left = self.clients.get(client, 0) - size
        if left > 0:
            self.clients[client] = left
        else:
            self.clients.pop(client, None)


@dataclass
class BodyLimits:
    """Largest body per route path; ``default`` for every path not registered."""

    default: int = 64 * 1024
    routes: dict[str, int] = field(default_factory=dict)

    def set(self, path: str, limit: int) -> None:
        self.routes[path] = limit

    def for_path(self, path: str) -> int:
        return self.routes.get(path, self.default)


def _problem(status: int, title: str, detail: str) -> tuple[dict[str, Any], list[Any]]:
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is not read: the connection cannot carry
            # another request, and closing it frees the slot now.
            (b"connection", b"close"),
        ],
    }
    return start, [{"type": "http.response.body", "body": body}]


@dataclass(frozen=True)
class _Refused:
    status: int
    reason: str
    detail: str


_TITLES = {408: "Request timeout", 413: "Payload too large", 503: "Service unavailable"}
#: The body budget is a moment's state: others' bodies finish within the body timeout.
_BUSY_RETRY_AFTER = b"1"


class BodyLimitMiddleware:
    """Body size and body time, enforced while the body streams in (pure ASGI:
    Starlette's BaseHTTPMiddleware would read the body itself)."""

    def __init__(
        self,
        app: ASGIApp,
        limits: BodyLimits,
        body_timeout_s: float,
        budget: BodyBudget | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.body_timeout_s = body_timeout_s
        self.budget = budget or BodyBudget(HttpLimitSettings().max_body_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # before a byte of it is read
            await self._refuse(scope, send, _too_large(limit))
            return
        body = _Body(self, scope, receive, send, limit)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.answered:
                raise
            # The app failed on the body it did not get; the sender has its answer.
            log.debug("app error after a refused body", exc_info=True)
        finally:
            self.budget.give(body.charged, body.client)

    async def _refuse(self, scope: Scope, send: Send, refused: _Refused) -> None:
        client = scope.get("client")
        HTTP_REFUSED.labels(refused.reason).inc()
        log.warning(
            "http request refused: %s",
            refused.reason,
            extra={
                "path": scope["path"],
                "peer": client[0] if client else None,
                "status": refused.status,
                "detail": refused.detail,
            },
        )
        start, body = _problem(refused.status, _TITLES[refused.status], refused.detail)
        if refused.status == 503:
            start["headers"].append((b"retry-after", _BUSY_RETRY_AFTER))
        await send(start)
        for message in body:
            await send(message)


class _Body:
    """One request's body as it streams in through :class:`BodyLimitMiddleware`: its
    size against the route's limit, its time against the deadline, its bytes against
    the budget; a refusal answered from inside ``receive``."""

    def __init__(
        self,
        middleware: BodyLimitMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        limit: int,
    ) -> None:
        self.middleware = middleware
        self.scope = scope
        self._receive = receive
        self._send = send
        self.limit = limit
        self.deadline = time.monotonic() + middleware.body_timeout_s
        peer = scope.get("client")
        self.client = client_key(peer[0] if peer else None)
        self.received = 0
        self.charged = 0  # received and taken from the budget; given back at the end
        self.done = False
        self.started = False
        self.answered = False

    async def refuse(self, refused: _Refused) -> Message:
        # Answered from inside receive: the app (FastAPI turns any error while
        # reading a body into a 400) only learns that the client is gone.
        self.done = True
        if not self.started:
            self.answered = True
            await self.middleware._refuse(self.scope, self._send, refused)
        return {"type": "http.disconnect"}

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        pending = self._receive()
        waited: Message | None
        try:
            # Nearly always the body is already there: the first step of the server's
            # receive returns it without waiting, and needs no timer (asyncio.timeout
            # cost 5 µs a request, 2026-12-02). Only a receive that has to wait gets one.
            waiting = pending.send(None) if inspect.iscoroutine(pending) else _NOT_STARTED
        except StopIteration as finished:
            waited = cast(Message, finished.value)
        except TimeoutError:  # the server's own: answered as the deadline's
            waited = None
        else:
            waited = await self._wait(pending, waiting)
        if waited is None:
            timeout = self.middleware.body_timeout_s
            return await self.refuse(
                _Refused(408, "body-timeout", f"the body did not arrive within {timeout:g} s")
            )
        message = waited
        if message["type"] != "http.request":
            self.done = True
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            return await self.refuse(_too_large(self.limit))
        budget = self.middleware.budget
        size = self.received - self.charged
        if size > 0:
            if not budget.take(size, self.client, self.charged, self.limit):
                return await self.refuse(_busy(budget, whole=budget.held + size > budget.limit))
            self.charged = self.received
        self.done = not message.get("more_body", False)
        return message

    async def _wait(self, pending: Awaitable[Message], waiting: object) -> Message | None:
        """The rest of a receive that had to wait, within the body's deadline; None
        when the deadline passed. ``waiting`` is what its first step waits on, or
        ``_NOT_STARTED`` for an awaitable that is not a coroutine."""
        remaining = self.deadline - time.monotonic()
        try:
            # asyncio.timeout, not wait_for: no task wrapped around each receive
            # (wait_for's was a few % of a hook's time, py-spy 2026-11-29).
            async with asyncio.timeout(max(remaining, 0.001)):
                if waiting is _NOT_STARTED:
                    return await pending
                return await _Resumed(cast(Coroutine[Any, Any, Message], pending), waiting)
        except TimeoutError:
            return None

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the app's answer to a request already refused
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


_NOT_STARTED = object()


class _Resumed:
    """Awaits the rest of a coroutine whose first step already ran and stopped at
    ``waiting`` (a future): the event loop's task waits on that future as if the
    coroutine had been awaited from the start; what the task sends or throws in
    (a result, a cancellation, the timeout's) goes on into the coroutine."""

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, Message], waiting: object) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, Message]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown on into the coroutine
                try:
                    waiting = coro.throw(exc)
                except StopIteration as finished:
                    return cast(Message, finished.value)
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration as finished:
                    return cast(Message, finished.value)


def _too_large(limit: int) -> _Refused:
    return _Refused(413, "body-too-large", f"the body is over {limit} bytes")


def _busy(budget: BodyBudget, *, whole: bool) -> _Refused:
    log.debug("body budget full", extra={"held": budget.held, "limit": budget.limit})
    if whole:
        detail = "the server holds as many request bodies as it takes at once"
    else:
        detail = "this address holds as much of the server's room for bodies as one may"
    return _Refused(503, "body-budget", f"{detail}; retry shortly")


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in an ASGI scope, as sent."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = scope_header(scope, b"content-length")
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    return int(text) if text.isdigit() else None


# -- connections --------------------------------------------------------------


def _raw_problem(status: int, reason: str, title: str, detail: str, *headers: bytes) -> bytes:
    """A whole HTTP/1.1 problem+json answer that closes the connection, as bytes: for
    the guard, which answers below uvicorn, before any request object exists."""
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    head = [
        f"HTTP/1.1 {status} {reason}".encode(),
        b"content-type: application/problem+json",
        *headers,
        b"connection: close",
        b"content-length: " + str(len(body)).encode(),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body.encode()


TOO_MANY_RESPONSE = _raw_problem(
    429,
    "Too Many Requests",
    "Too many connections",
    "this address holds too many open connections; close some and retry",
    b"retry-after: 1",
)
HEADERS_TOO_LARGE_RESPONSE = _raw_problem(
    431,
    "Request Header Fields Too Large",
    "Request header fields too large",
    "the request line and headers are over the server's limit",
)


LINGER_S = 1.0  # how long a refused connection drains before it is closed

#: Complete requests one connection may have waiting behind the one being answered
#: (HTTP/1.1 pipelining). uvicorn parses every request of a read and queues it: one
#: connection pipelining 1.2 million tiny requests took a server to 3 GB and held
#: it (attacker review, 2026-12-03). Browsers and providers do not pipeline; a
#: benchmark that does sends 16 or so.
MAX_PIPELINED = 32

#: Body bytes of a request already answered (a 401, 404 or 429 sent before its body
#: was read) that a connection may still drop before it is closed: within it, the
#: rest of a small body passes and the connection serves the next request; past it
#: the sender is told nothing more and the connection closes. Go's net/http keeps
#: the same amount to reuse a connection whose handler left its body unread.
DISCARD_AFTER_ANSWER_BYTES = 256 * 1024


@dataclass
class ConnectionGuard:
    """Open connections per client (an IPv4 address, an IPv6 /64: see
    :func:`client_key`), with a cap (trusted proxies exempt: their connections are
    many clients), and the most header bytes one request may send."""

    max_per_client: int
    header_timeout_s: float
    trusted: tuple[Network, ...] = ()
    max_header_bytes: int = 64 * 1024
    send_timeout_s: float = 60.0
    open: dict[str, int] = field(default_factory=dict)

    def admit(self, host: str) -> bool:
        key = client_key(host)
        count = self.open.get(key, 0)
        if count >= self.max_per_client and not trusted(host, self.trusted):
            return False
        self.open[key] = count + 1
        return True

    def release(self, host: str) -> None:
        key = client_key(host)
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


def guarded_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type[Any]:
    """uvicorn's HttpToolsProtocol with the per-client cap, the header deadline and
    the header size. It keeps the request in flight in ``self.cycle``: a new cycle
    object means a request's headers were complete.

    httptools calls the protocol's ``on_headers_complete``, ``on_body`` and
    ``on_message_complete``; between the first and the last a request's body is
    open. Bytes read outside a body are request lines and headers, counted against
    ``max_header_bytes`` and the header deadline, also while an earlier request is
    still being answered (pipelined). Bytes read inside a body that carry none of
    it (trailers, chunk framing) are counted too, and reset by each read that does:
    uvicorn keeps every trailer. After an early answer (a 401 before the body was
    read) uvicorn drops the rest of the body; that rest is bounded by
    ``DISCARD_AFTER_ANSWER_BYTES`` and by the header deadline, which runs from its
    first byte to the next request's headers. (uvicorn's h11 protocol has none of
    these callbacks; httptools is a dependency, so it is never the base here.)"""

    class GuardedProtocol(base):  # type: ignore[valid-type,misc]
        _peer: str | None = None
        _header_timer: asyncio.TimerHandle | None = None
        _header_cycle: object = None
        _header_bytes: int = 0
        _refused: bool = False
        _body_open: bool = False  # between a request's headers' end and its body's end
        _payload: int = 0  # body bytes httptools has delivered on this connection
        _discarded: int = 0  # body bytes dropped after the request was answered
        _framing: int = 0  # bytes read in a row inside a body that carried none of it
        _running: Any = None  # the request whose app runs (uvicorn's cycle)
        _keep_alive_then: bool | None = None  # its keep-alive, while "close" is forced
        _send_timer: asyncio.TimerHandle | None = None

        def on_message_begin(self) -> None:
            if self._refused:
                # Refused: stop httptools in the rest of this read (it raises our
                # error as HttpParserCallbackError; send_400_response stays silent).
                raise ConnectionAbortedError("connection refused by the guard")
            self._body_open = False  # headers first: they count as header bytes
            self._discarded = 0
            self._framing = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()  # uvicorn's new cycle for this request
            self._body_open = True
            cycle = getattr(self, "cycle", None)
            if cycle is None:
                return
            expects_100 = bool(getattr(self, "expect_100_continue", False))
            if expects_100 or (self.parser.should_upgrade() and self._has_body()):
                # Until its body is in, an answer to it says "Connection: close": an
                # early one to Expect: 100-continue leaves its client unsure whether
                # to send the body; httptools skips the body of an upgrade request
                # (curl --http2 -d sends one), which would be read as a next
                # request. (An upgrade probe without a body, curl's h2c, keeps its
                # connection: later reads are parsed as usual.)
                self._keep_alive_then = cycle.keep_alive
                cycle.keep_alive = False
            if len(getattr(self, "pipeline", ())) > MAX_PIPELINED:
                HTTP_REFUSED.labels("pipelined").inc()
                log.warning(
                    "http connection closed: too many pipelined requests",
                    extra={"peer": self._peer, "limit": MAX_PIPELINED},
                )
                self._abort(cycle)  # the queued answers are dropped with it

        def _has_body(self) -> bool:
            for name, value in getattr(self, "headers", ()):
                if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                    return True
            return False

        def on_body(self, body: bytes) -> None:
            self._payload += len(body)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_open = False
            cycle = getattr(self, "cycle", None)
            if self._keep_alive_then is not None and cycle is not None:
                if not cycle.response_started and not self.parser.should_upgrade():
                    cycle.keep_alive = self._keep_alive_then  # the body is in after all
                self._keep_alive_then = None
            super().on_message_complete()

        def pause_writing(self) -> None:
            super().pause_writing()
            self._watch_send()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def timeout_keep_alive_handler(self) -> None:
            super().timeout_keep_alive_handler()  # close(), which waits for the buffer
            self._watch_send()

        def _watch_send(self) -> None:
            """Bound the wait for the client to take what is buffered for it: uvicorn
            waits without one (paused writes; close() after an answer or at the
            keep-alive timeout, with bytes still buffered), holding the connection
            and its slot for good. Like nginx's send_timeout, the bound is on time
            without progress: a slow reader that keeps taking bytes is not cut."""
            waiting = self._send_timer is None and not self._refused
            if waiting and self.transport.get_write_buffer_size():
                self._arm_send(self._unsent())

        def _arm_send(self, unsent: int) -> None:
            loop = asyncio.get_running_loop()
            self._send_timer = loop.call_later(guard.send_timeout_s, self._send_deadline, unsent)

        def _unsent(self) -> int:
            """Bytes not yet taken by the client: the transport's buffer, and the
            kernel's send queue (SIOCOUTQ), which can hold megabytes and is written
            to again only once a third of it is free: counted alone, the buffer of a
            client reading 500 KB/s did not move for seconds."""
            unsent = int(self.transport.get_write_buffer_size())
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                    unsent += int.from_bytes(queued, sys.byteorder)
                except OSError:
                    pass
            return unsent

        def _send_deadline(self, buffered_then: int) -> None:
            self._send_timer = None
            if not self.transport.get_write_buffer_size() or self._refused:
                return
            unsent = self._unsent()
            if unsent < buffered_then:  # the client took some: another period
                self._arm_send(unsent)
                return
            HTTP_REFUSED.labels("send-timeout").inc()
            log.warning(
                "http connection closed: the client took none of its answer in time",
                extra={"peer": self._peer, "timeout_s": guard.send_timeout_s},
            )
            self._abort(getattr(self, "cycle", None))

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                self._watch_send()  # closed after its answer (keep-alive off), unread

        def send_400_response(self, msg: str) -> None:
            if self._refused:
                return  # the parser stopped on our own error (on_message_begin)
            cycle = getattr(self, "cycle", None)
            if self._body_open and cycle is not None and cycle.response_complete:
                # The framing of a body whose request has its answer broke: close
                # rather than send that one request a second answer.
                self._close()
                return
            super().send_400_response(msg)  # uvicorn's: the 400, then close()
            self._watch_send()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not guard.admit(host):
                HTTP_REFUSED.labels("connections").inc()
                log.warning(
                    "http connection refused: too many from one address",
                    extra={"peer": host, "limit": guard.max_per_client},
                )
                # Not isinstance(transport, asyncio.WriteTransport): uvloop's TCP
                # transports are not registered as one, and the 429 went unsent.
                write = getattr(transport, "write", None)
                if write is not None:
                    write(TOO_MANY_RESPONSE)
                transport.close()
                return
            self._peer = host
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is not None:
                guard.release(self._peer)
                self._peer = None
            for timer in (self._header_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._send_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # refused; what the client still sends is dropped unread
            cycle = getattr(self, "cycle", None)
            if self._body_open:
                self._body_received(cycle, data)
                return
            if self._header_timer is None or self._header_cycle is not cycle:
                # The first bytes of a next request on a kept-alive connection.
                self._arm_header_deadline()
            self._header_bytes += len(data)
            super().data_received(data)
            # Still no new request after all these bytes: they are all request line
            # and headers. httptools keeps every header byte it is sent (h11 stops at
            # 16 KB): 8 connections sending 50 MB of headers each took the server
            # from 217 to 626 MB (attacker review, 2026-11-30).
            if (
                self._header_bytes > guard.max_header_bytes
                and getattr(self, "cycle", None) is self._header_cycle
                and not self.transport.is_closing()
            ):
                self._headers_too_large(cycle, "request headers too large")

        def _body_received(self, cycle: Any, data: bytes) -> None:  # noqa: ANN401 - uvicorn's cycle
            answered = cycle is not None and cycle.response_complete
            if answered and (self._header_timer is None or self._header_cycle is not cycle):
                # The first bytes after an early answer: the body's rest and the next
                # request's headers must come within the header deadline.
                self._arm_header_deadline()
            before = self._payload
            super().data_received(data)
            delivered = self._payload - before
            if self.transport.is_closing():
                return
            if answered:
                # The body's bytes; while it has not ended, the whole read (chunk
                # framing without end after an answer cost a core for the deadline).
                self._discarded += len(data) if self._body_open else delivered
                if self._discarded > DISCARD_AFTER_ANSWER_BYTES:
                    HTTP_REFUSED.labels("body-after-answer").inc()
                    log.warning(
                        "http connection closed: the body of an answered request went on",
                        extra={"peer": self._peer, "limit": DISCARD_AFTER_ANSWER_BYTES},
                    )
                    self._refuse_lingering(b"")  # the request has its answer already
                    return
            # Trailers (uvicorn appends each to the request's headers) or chunk
            # framing without end: one connection took a server from 234 MB to 1.9 GB
            # in 5 s with trailers (attacker review, 2026-12-03).
            self._framing = 0 if delivered else self._framing + len(data)
            if self._body_open and self._framing > guard.max_header_bytes:
                self._headers_too_large(cycle, "request trailers or chunk framing too large")

        def _headers_too_large(self, cycle: Any, why: str) -> None:  # noqa: ANN401
            HTTP_REFUSED.labels("header-size").inc()
            log.warning(
                f"http connection closed: {why}",
                extra={"peer": self._peer, "limit": guard.max_header_bytes},
            )
            # 431 only when no answer is on its way: not while a request is being
            # handled (its client would take the 431 for its answer, and the real
            # one raised, written after our end was shut), nor into an earlier
            # request's (pipelined: uvicorn holds the later ones in `pipeline`, and
            # `cycle` is the newest), nor to a request answered early. Otherwise the
            # connection just closes.
            if self._body_open:  # its trailers: the 431 answers this request
                quiet = cycle is not None and not cycle.response_started
            else:  # the next request's headers
                quiet = cycle is None or cycle.response_complete
            quiet = quiet and not getattr(self, "pipeline", None)
            if quiet:
                self._refuse_lingering(HEADERS_TOO_LARGE_RESPONSE)
            else:
                self._abort(cycle)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:  # noqa: ANN401
            # uvicorn's (private) start of a request's app: the one request being
            # answered, which `cycle` (the newest, pipelined) may not be.
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def _stop_cycle(self, cycle: Any) -> None:  # noqa: ANN401 - uvicorn's cycle
            """What uvicorn's connection_lost does to the request in flight, for every
            request on the connection (the one being answered and the pipelined
            ones; uvicorn's marks only the newest): its app's receive() returns a
            disconnect and its send() does nothing. Written after our end was shut,
            an answer raised in the app ("Cannot call write() after write_eof()",
            or "the handler is closed", on uvloop)."""
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            waiting = [pipelined for pipelined, _app in getattr(self, "pipeline", ())]
            for each in (self._running, cycle, *waiting):
                if each is not None and not each.response_complete:
                    each.disconnected = True
                    each.message_event.set()

        def _abort(self, cycle: Any) -> None:  # noqa: ANN401 - uvicorn's cycle
            """Refuse at once, with what is buffered: not close(), which waits for
            answers a client that floods or never reads may never take. What an
            earlier request still writes is dropped."""
            self._refused = True
            self._stop_cycle(cycle)
            self.transport.abort()

        def _refuse_lingering(self, response: bytes) -> None:
            """Answer, end our side, and close a second later, reading and dropping
            what the client still sends meanwhile (nginx's lingering close): closed
            at once with its bytes unread, the kernel resets the connection, and a
            client still sending loses the answer it had not read yet. Only with no
            other answer on its way (see _headers_too_large)."""
            self._refused = True
            self._stop_cycle(getattr(self, "cycle", None))
            if response:
                self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self._close_after_linger)

        def _close(self) -> None:
            """close(), which waits for what is still buffered for the client: that
            wait is bounded by the send timeout, as every close here."""
            self.transport.close()
            self._watch_send()

        def _close_after_linger(self) -> None:
            # close() waits until what is buffered is sent; a client that has read
            # nothing of it by now would hold the connection (and its slot) for good.
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn's says to install a websocket library; none is wanted here
            # (`ws="none"`), and a stranger's upgrade request is not worth a warning.
            log.debug("http upgrade request answered as a plain request")

        def _arm_header_deadline(self) -> None:
            self._header_bytes = 0
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_cycle = getattr(self, "cycle", None)
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(guard.header_timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            if getattr(self, "cycle", None) is not self._header_cycle:
                return  # the headers arrived: a request is (or was) in flight
            if self.transport.is_closing():
                return
            if self._body_open:
                HTTP_REFUSED.labels("body-after-answer").inc()
                log.warning(
                    "http connection closed: the body of an answered request did not end in time",
                    extra={"peer": self._peer, "timeout_s": guard.header_timeout_s},
                )
                self._close()
                return
            if self._header_bytes == 0 and self._header_cycle is not None:
                # Idle after an answered request's body ended (the deadline ran from
                # its first dropped byte): uvicorn's keep-alive timer, which each
                # read cancels, would have closed it too.
                self._close()
                return
            HTTP_REFUSED.labels("header-timeout").inc()
            log.warning(
                "http connection closed: headers not complete in time",
                extra={"peer": self._peer, "timeout_s": guard.header_timeout_s},
            )
            self._close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol
