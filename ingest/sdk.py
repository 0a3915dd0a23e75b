"""The adapter interface: what every channel is, so a new one reads like the others.

An adapter is a class with

- ``name`` (its entry point name), ``summary`` (one line for ``switchboard
  adapters list``) and ``settings_class`` (the pydantic model of its
  configuration, secrets as ``SecretStr``);
- ``__init__(settings, context)``: the settings, and an :class:`AdapterContext`
  holding the durable :class:`~ingest.handoff.HandOff` it must call with every
  message;
- async ``start()`` and ``stop()``: return once serving; stop accepting, finish
  what is in flight.

It answers its sender only after ``handoff.deliver`` returned, and maps the
error families of :mod:`ingest.errors` onto its protocol: :class:`RetryLater`
(nothing is durable: the sender must retry), :class:`Rejected` (refused for a
reason the sender can act on), :class:`Stop` (this adapter cannot go on).

An adapter that receives over HTTP subclasses :class:`HttpAdapter` and only
declares its routes, its authentication and its normalizer; the app mounts it
and runs the request cycle (limits, metrics, hand-off, answers) the same way
for every such adapter.

Configuration: every adapter, the four built-in channels included, is configured,
and enabled, by its own table in the config file::

    [adapters.mailgun]
    enabled = true
    max_age_s = 300

and by ``SWITCHBOARD_<NAME>_*`` environment variables if its settings class is a
pydantic-settings class with that prefix (secrets belong there, not in the file).
The loader hands each adapter only these tables (:class:`AdapterTables`); the
historic ``[smtp]``, ``[twilio]``, ``[imap]`` and ``[[webhooks]]`` sections reach
the built-ins as their ``[adapters.<name>]`` tables, folded in by the loader.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes
from uuid import UUID

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, JsonValue, SecretStr, ValidationError
from pydantic_settings import BaseSettings
from python_multipart.multipart import parse_options_header
from starlette.datastructures import QueryParams

from ingest.errors import Rejected, RetryLater, Stop
from ingest.handoff import HandOff
from ingest.ratelimit import ClientBuckets
from ingest.workers import OverMemory, ParserPool, WorkerCrashed
from normalize.content import Blob, Normalized
from normalize.errors import NormalizeError
from normalize.identity import EmailPolicy
from switchboard.config import adapter_settings
from switchboard.http import counted, problem, read_body, unavailable
from switchboard.ids import uuid7
from switchboard.limits import scope_header, share

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

#: Bodies longer than this are authenticated on a thread, off the event loop.
INLINE_AUTH_BYTES = 256 * 1024
#: The URLs a hook remembers (HttpAdapter._signed_url), and the longest Host and
#: query it remembers one for: 256 of at most 512 bytes, about 200 KB a hook.
URLS_KEPT = 256
URL_KEPT_BYTES = 512
_NO_QUERY = QueryParams("")
#: Most parts of a multipart/form-data body read (past them: malformed).
MAX_FORM_PARTS = 1000

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


def _stop_process(reason: str) -> None:
    # The runtime's graceful path: SIGTERM stops edges first, drains, exits.
    log.critical("adapter asked the process to stop: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


class AdapterTables(Protocol):
    """What an adapter reads of the process settings: the ``[adapters.<name>]``
    tables of the config file (``switchboard.settings.Settings`` is one)."""

    @property
    def adapters(self) -> Mapping[str, Mapping[str, Any]]: ...


@dataclass(frozen=True)
class AdapterContext:
    """What the process gives every adapter: the hand-off and shared facts."""

    handoff: HandOff
    bind_host: str = "127.0.0.1"
    public_url: str | None = None  # the base URL senders call, for signatures
    engine: Engine | None = None  # the process database (checkpoints, state)
    email_policy: EmailPolicy | None = None
    on_stop: Callable[[str], None] = field(default=_stop_process, repr=False)
    #: Processes serving this adapter's port together (``--workers``). A limit the
    #: adapter counts in its own process (connections, requests per second) is
    #: divided by it: :meth:`share`, so the fleet allows what the setting says.
    workers: int = 1
    #: Listening sockets inherited from the supervisor, by name (``http``, ``smtp``):
    #: a listener serves the one of its name instead of binding its port.
    sockets: Mapping[str, socket.socket] = field(default_factory=dict, repr=False)
    #: The HTTP process's parse processes, where an ``offload`` adapter's ``parse``
    #: runs (None: on a thread of this process).
    parsers: ParserPool | None = field(default=None, repr=False)

    def share(self, limit: int) -> int:
        """This process's part of ``limit`` (switchboard.limits.share)."""
        return share(limit, self.workers)

    def share_rate(self, rate: float) -> float:
        """This process's part of a rate (per second)."""
        return rate / self.workers


class Adapter(Generic[S]):
    """Base of every channel adapter. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings_class: ClassVar[type[Any]]
    #: The process role that runs it: ``http`` (the ingest process with the HTTP
    #: server, the default), ``smtp`` or ``imap``.
    role: ClassVar[str] = "http"
    #: True for a component that accepts input from outside by itself (a
    #: listener, a poller): edges stop first at shutdown.
    edge: ClassVar[bool] = True

    def __init__(self, settings: S, context: AdapterContext) -> None:
        self.settings = settings
        self.context = context
        self.handoff = context.handoff

    @classmethod
    def section(cls, settings: AdapterTables) -> Mapping[str, Any] | None:
        """This adapter's ``[adapters.<name>]`` table, or None when absent."""
        return settings.adapters.get(cls.name)

    @classmethod
    def settings_from(cls, settings: AdapterTables) -> S:
        """This adapter's settings from its table (file) and the environment."""
        built: S = adapter_settings(cls.settings_class, cls.section(settings) or {}, cls.name)
        return built

    @classmethod
    def enabled_in(cls, settings: AdapterTables) -> bool:
        """Whether ``switchboard run`` starts it. ``[adapters.<name>] enabled = false``
        switches any adapter off; otherwise :meth:`configured_in` decides."""
        section = cls.section(settings)
        if section is not None and section.get("enabled", True) is False:
            return False
        return cls.configured_in(settings)

    @classmethod
    def configured_in(cls, settings: AdapterTables) -> bool:
        """An installed adapter never runs unasked: only with its table present. (The
        built-in channels run by default as they always have: they decide by their
        settings.)"""
        return cls.section(settings) is not None

    @classmethod
    def build(cls, settings: AdapterTables, context: AdapterContext) -> Adapter[S]:
        return cls(cls.settings_from(settings), context)

    async def start(self) -> None:
        """Return once serving; raise :class:`Stop` (or StartupError) if it cannot."""

    async def stop(self) -> None:
        """Stop accepting, finish the hand-offs in flight, release resources."""

    def __repr__(self) -> str:
        # Never the settings: they hold credentials.
        return f"<{type(self).__name__} adapter {self.name!r}>"


@dataclass(frozen=True)
class HttpRoute:
    """One endpoint of an HTTP adapter, as the app mounts it."""

    path: str
    summary: str
    description: str = ""
    content_types: tuple[str, ...] = (FORM,)
    max_body_bytes: int = 1024 * 1024
    status_code: int = 200  # of the success answer (and in the API documentation)
    responses: Mapping[int, str] = field(default_factory=dict)
    metric: str | None = None  # label of the received/rejected metrics (default: name)
    options: Any = None  # whatever the adapter needs per route (a hook's settings)
    #: Per-client rate limit (requests per second, burst) for a public route; None
    #: for providers, whose requests all come from the provider's few addresses.
    client_rate: tuple[float, int] | None = None
    max_form_fields: int = 1000  # of a form-encoded body (413 past it)
    max_field_bytes: int | None = None  # of one form value (default: the body limit)


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body, bytes as sent."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str = "text/plain"


@dataclass(frozen=True)
class InboundRequest:
    """One HTTP request as an adapter sees it: read and bounded, not yet trusted."""

    route: HttpRoute
    body: bytes
    headers: Mapping[str, str]  # case-insensitive
    query: Mapping[str, str]
    url: str  # the URL the sender called (public URL applied): what signatures cover
    media_type: str  # lower case, without parameters
    content_type: str  # the whole header, parameters (boundary, charset) included
    peer: str | None
    message_id: UUID  # the UUIDv7 this arrival gets
    received_at: datetime
    _parsed: dict[object, Any] = field(default_factory=dict, repr=False, compare=False)

    def portable(self) -> InboundRequest:
        """This request as it crosses to a parse process: without what was parsed."""
        return dataclasses.replace(self, _parsed={})

    def once(self, parse: Callable[[InboundRequest], T]) -> T:
        """``parse(self)``, computed once per request: authentication and the
        normalizer often both need the parsed body (a signature inside a form)."""
        if parse not in self._parsed:
            self._parsed[parse] = parse(self)
        result: T = self._parsed[parse]
        return result

    def form(self) -> dict[str, str]:
        """An urlencoded body as a dict (blank values kept); NormalizeError if not UTF-8,
        Rejected (413) past the route's field count or field size."""
        return parse_form(
            self.body,
            max_fields=self.route.max_form_fields,
            max_field_bytes=self.route.max_field_bytes or self.route.max_body_bytes,
        )

    def parts(self, max_parts: int = MAX_FORM_PARTS) -> list[Part]:
        """A multipart/form-data body, parsed by the standard library's MIME parser
        (it keeps every part's bytes, so a field in another charset can be decoded
        with the charset the sender names)."""
        _, options = parse_options_header(self.content_type)
        boundary = options.get(b"boundary")
        if boundary and self.body.count(b"--" + boundary) > max_parts + 1:
            # Counted before the parse: the parser's cost and memory grow with the
            # parts (10 MB of empty ones: 16 s and 461 MB, review of 2026-12-01).
            raise NormalizeError("malformed", f"more than {max_parts} parts")
        head = f"Content-Type: {self.content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = BytesParser(policy=policy.compat32).parsebytes(head + self.body)
        if not message.is_multipart() or not message.get_param("boundary"):
            raise NormalizeError("malformed", "the body is not multipart/form-data")
        payload = message.get_payload()
        if not isinstance(payload, list) or not payload:
            raise NormalizeError("malformed", "the multipart body has no parts")
        if len(payload) > max_parts:
            raise NormalizeError("malformed", f"more than {max_parts} parts")
        return [_part(p) for p in payload if isinstance(p, Message)]


def parse_form(
    body: bytes, *, max_fields: int, max_field_bytes: int, errors: str = "strict"
) -> dict[str, str]:
    """An urlencoded body as a dict (blank values kept), bounded: the standard
    library's ``max_num_fields`` refuses a form of a million empty fields before
    building it; NormalizeError if not UTF-8 (``errors="replace"`` decodes leniently
    instead, for a signature computed over what the sender sent)."""
    try:
        text = body.decode("utf-8", errors)
        pairs = (
            _ascii_pairs(text, max_fields)
            if body.isascii()
            else parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields)
        )
    except UnicodeDecodeError as exc:
        raise NormalizeError("malformed", "the form is not UTF-8") from exc
    except ValueError as exc:  # "Max number of fields exceeded"
        raise Rejected("form-too-large", f"more than {max_fields} form fields", status=413) from exc
    for name, value in pairs:
        if len(value) > max_field_bytes:
            raise Rejected(
                "form-too-large",
                f"form field {name[:40]!r} is over {max_field_bytes} bytes",
                status=413,
            )
    return dict(pairs)


def _ascii_pairs(text: str, max_fields: int) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields)`` for an
    all-ASCII form (every form a provider sends: it percent-encodes the rest), in
    a third of its time (a 20-field Twilio form: 12 against 32 µs here). For ASCII,
    ``unquote`` is ``unquote_to_bytes`` decoded as UTF-8 with replacement; what
    parse_qsl adds around it (argument coercion, a regex split per field) is for
    any input. ``tests/unit/test_forms.py`` checks the two agree."""
    if text and text.count("&") + 1 > max_fields:
        raise ValueError("Max number of fields exceeded")  # as parse_qsl says it
    pairs = []
    for field_ in text.split("&"):
        if not field_:
            continue
        name, _, value = field_.partition("=")
        if "+" in name:
            name = name.replace("+", " ")
        if "%" in name:
            name = unquote_to_bytes(name).decode("utf-8", "replace")
        if "+" in value:
            value = value.replace("+", " ")
        if "%" in value:
            value = unquote_to_bytes(value).decode("utf-8", "replace")
        pairs.append((name, value))
    return pairs


def _part(message: Message) -> Part:
    name = message.get_param("name", header="content-disposition")
    filename = message.get_filename()
    data = message.get_payload(decode=True)
    return Part(
        name=str(name) if isinstance(name, str) else "",
        data=data if isinstance(data, bytes) else b"",
        filename=filename,
        content_type=message.get_content_type(),
    )


def require_basic_auth(
    request: InboundRequest | Mapping[str, str],
    username: str,
    password: SecretStr | None,
    *,
    realm: str,
    wrong_status: int = 403,
) -> None:
    """HTTP Basic, for providers that cannot sign their requests (SendGrid Inbound
    Parse, Postmark inbound): the credentials go into the URL configured at the
    provider, ``https://user:password@host/webhooks/...``. Compared in constant time;
    with no password configured nothing is let in. Takes the request or its headers
    alone (:meth:`HttpAdapter.authenticate_headers`)."""
    headers = request.headers if isinstance(request, InboundRequest) else request
    challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise Rejected("auth", "HTTP Basic credentials are required", status=401, headers=challenge)
    try:
        given_user, _, given_password = (
            base64.b64decode(encoded, validate=True).decode().partition(":")
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(
            "auth", "malformed Basic credentials", status=401, headers=challenge
        ) from exc
    expected = password.get_secret_value() if password is not None else ""
    user_ok = hmac.compare_digest(given_user.encode(), username.encode())
    password_ok = hmac.compare_digest(given_password.encode(), expected.encode())
    if not expected or not (user_ok and password_ok):
        raise Rejected("auth", "wrong credentials", status=wrong_status, headers=challenge)


def _unrecorded(error: Rejected) -> Rejected:
    """The same refusal, without the promise that a record of it was kept."""
    return Rejected(error.reason, error.detail, status=error.status, headers=error.headers)


def _media_matches(media: str, accepted: str) -> bool:
    if media == accepted:
        return True
    # application/vnd.example+json is JSON too.
    return accepted == JSON and media.startswith("application/") and media.endswith("+json")


class HttpAdapter(Adapter[S]):
    """An adapter that receives over HTTP: it declares, the app runs the cycle.

    Subclasses implement :meth:`routes`, :meth:`authenticate` and :meth:`normalize`
    and may override the answers. The cycle, for every request:

    1. the media type against the route's ``content_types`` (415);
    2. :meth:`authenticate_headers`: whatever of the credentials the headers alone
       show (HTTP Basic, a bearer token, a signature's presence and timestamp), so
       a stranger's 50 MB body is refused before it is read;
    3. the body, refused past ``max_body_bytes`` without buffering it (413; the
       server's :class:`~switchboard.limits.BodyLimitMiddleware` enforces the same
       limit before the route runs);
    4. rate limits: the route's per-client limit, then :meth:`admit` (429);
    5. :meth:`authenticate` (raise ``Rejected(status=401 or 403)``; with
       ``record=True`` the refusal is also kept as a dead letter, bounded by the
       hand-off's evidence budget), then :meth:`admit_authenticated` (429): a budget
       only authenticated requests spend, so a stranger's junk cannot spend it;
    5. :meth:`normalize` (raise ``NormalizeError`` or ``Rejected``): with
       ``malformed = "reject"`` a NormalizeError answers ``malformed_status``;
       with ``"dead-letter"`` the raw body is kept as a dead letter and the sender
       gets its success answer, for providers whose retries would never succeed;
    6. ``handoff.deliver``: :class:`RetryLater` answers ``retry_status`` (503)
       with Retry-After; only after it returns does :meth:`accepted` answer.
    """

    role = "http"
    edge = False  # the HTTP server is the edge; its stop comes first
    malformed: ClassVar[Literal["reject", "dead-letter"]] = "reject"
    malformed_status: ClassVar[int] = 400
    #: True for an adapter whose input is mail (a raw email, or parts the standard
    #: library's MIME parser reads): it implements :meth:`parse` instead of
    #: :meth:`normalize`, and the cycle runs it in the HTTP process's parse
    #: processes (``[http] parse_workers``), where a call still running after
    #: ``parse_timeout_s`` is killed, tried once more on a fresh process, then
    #: given up (``normalizer-error``): input built to make the parser crawl holds
    #: one parse process for two time limits, never the server, and never a thread
    #: for good. ``parse`` runs there on an instance made from the class and the
    #: settings alone (``__init__`` does not run): it may use ``self.settings`` and
    #: the class's attributes, not the context. Only authenticated requests reach
    #: it: keep :meth:`authenticate` cheap (Mailgun's reads three fields of its form
    #: with a streaming parser, never the whole form).
    offload: ClassVar[bool] = False
    retry_status: ClassVar[int] = 503

    def __init__(self, settings: S, context: AdapterContext) -> None:
        super().__init__(settings, context)
        self._client_buckets: dict[str, ClientBuckets] = {}
        self._urls: dict[tuple[object, ...], str] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:  # noqa: ANN401 - type's own
        super().__init_subclass__(**kwargs)
        if cls.offload and cls.parse is HttpAdapter.parse:
            raise TypeError(f"{cls.__name__}: an adapter with offload = True implements parse()")

    def routes(self) -> Sequence[HttpRoute]:
        raise NotImplementedError

    def authenticate(self, request: InboundRequest) -> None:
        """Raise :class:`Rejected` (401 missing, 403 wrong) unless the request is
        the sender's. Runs after :meth:`authenticate_headers` passed, so it checks
        only what needs the body. An adapter without authentication must say so by
        overriding this with a body that explains why."""
        raise NotImplementedError

    async def normalize(self, request: InboundRequest) -> Normalized:
        """The message in this request; an ``offload`` adapter implements
        :meth:`parse` instead, which this runs in a parse process."""
        if self.offload:
            return await self._parsed_apart(request)
        raise NotImplementedError

    def parse(self, request: InboundRequest) -> Normalized:
        """An ``offload`` adapter's normalizer: synchronous, run in a parse process."""
        raise NotImplementedError

    async def _parsed_apart(self, request: InboundRequest) -> Normalized:
        """:meth:`parse` in a parse process (on a thread when the process has none);
        given up on (crashed, or over its time limit, twice): ``normalizer-error``."""
        pool = self.context.parsers
        if pool is None:
            return await asyncio.to_thread(_parse_step, self, request)
        try:
            return await pool.run(_parse_apart, type(self), self.settings, request.portable())
        except OverMemory as exc:
            log.error(
                "a message needed more memory than its parse process may take",
                extra={"adapter": self.name, "message_id": str(request.message_id)},
            )
            raise NormalizeError("normalizer-error", f"{exc}; its raw body is kept") from exc
        except WorkerCrashed as exc:
            log.error(
                "a message crashed its parse process or outlasted its time, twice",
                extra={"adapter": self.name, "message_id": str(request.message_id)},
            )
            raise NormalizeError(
                "normalizer-error",
                f"parsing the message crashed the parser or took it over {pool.timeout_s:g} s, "
                "twice; its raw body is kept",
            ) from exc

    def authenticate_headers(self, route: HttpRoute, headers: Mapping[str, str]) -> None:
        """Raise :class:`Rejected` for credentials the headers alone prove missing or
        wrong, before the body is read. Default: nothing to check without the body."""

    async def admit(self, route: HttpRoute) -> None:
        """Raise ``Rejected(status=429, headers={"Retry-After": ...})`` to shed load.
        Runs after the content type and size checks and the route's per-client limit."""

    async def admit_authenticated(self, route: HttpRoute) -> None:
        """Like :meth:`admit`, for a request :meth:`authenticate` let in."""

    def admit_client(self, route: HttpRoute, client: str | None) -> None:
        """The route's per-client limit (``route.client_rate``): Rejected(429) past it."""
        if route.client_rate is None:
            return
        buckets = self._client_buckets.get(route.path)
        if buckets is None:
            rate, burst = route.client_rate
            buckets = self._client_buckets[route.path] = ClientBuckets(
                self.context.share_rate(rate), self.context.share(burst)
            )
        wait = buckets.take(client)
        if wait:
            raise Rejected(
                "rate-limit",
                "this client is over its rate limit",
                status=429,
                headers={"Retry-After": str(max(1, round(wait)))},
            )

    def accepted(self, request: InboundRequest, normalized: Normalized | None) -> Response:
        """The success answer; ``normalized`` is None when the input was dead-lettered."""
        if normalized is None:
            return JSONResponse(
                {"id": str(request.message_id)}, status_code=request.route.status_code
            )
        return JSONResponse(
            {"id": str(request.message_id), "dedupe_key": normalized.message.dedupe_key},
            status_code=request.route.status_code,
        )

    def refused(self, request: InboundRequest | None, error: Rejected) -> Response:
        titles = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden"}
        titles |= {406: "Not acceptable", 413: "Payload too large", 415: "Unsupported media type"}
        titles |= {429: "Too many requests"}
        # A refusal kept as a dead letter names its record, for whoever investigates.
        kept = {"id": str(request.message_id)} if request is not None and error.record else {}
        return problem(
            error.status,
            titles.get(error.status, "Refused"),
            error.detail,
            headers=dict(error.headers) or None,
            reason=error.reason,
            **kept,
        )

    def unavailable(self, error: RetryLater) -> Response:
        response = unavailable(error.retry_after_s)
        response.status_code = self.retry_status
        return response

    def dead_letter_metadata(self, request: InboundRequest) -> dict[str, JsonValue]:
        """Extra facts to keep with a dead-lettered request (provider ids)."""
        return {}

    # -- the cycle --------------------------------------------------------------

    def router(self) -> APIRouter:
        """The routes, for ``app.include_router``."""
        router = APIRouter(tags=["webhooks"])
        for route in self.routes():
            router.add_api_route(
                route.path,
                self._endpoint(route),
                methods=["POST"],
                name=f"{self.name}:{route.path}",
                summary=route.summary,
                description=route.description,
                status_code=route.status_code,
                response_class=Response,
                responses={
                    status: {"description": text} for status, text in route.responses.items()
                },
            )
        return router

    def mount(self, app: FastAPI) -> None:
        app.include_router(self.router())
        # The server's body limit for these paths is the route's own: one number,
        # enforced while the body streams in, before any of this cycle runs.
        body_limits = getattr(app.state, "body_limits", None)
        # The hook's POSTs skip the router (switchboard.http.DirectPosts): one lookup.
        # Not for an adapter that builds its own router (it may add dependencies the
        # direct path would skip), nor a templated path. The first adapter mounted on
        # a path keeps it, as in the router, whose first match answers.
        direct = getattr(app.state, "direct_posts", None)
        if type(self).router is not HttpAdapter.router:
            direct = None
        for route in self.routes():
            if body_limits is not None:
                body_limits.set(route.path, route.max_body_bytes)
            if direct is None or "{" in route.path:
                continue
            if route.path in direct:
                log.warning(
                    "two adapters serve one path: the first mounted answers",
                    extra={"adapter": self.name, "path": route.path},
                )
                continue
            direct[route.path] = self._endpoint(route)

    def _endpoint(self, route: HttpRoute) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await counted(route.metric or self.name, self.handle(route, request))

        return endpoint

    def _signed_url(self, request: Request) -> str:
        """The URL the sender called, as Starlette reads it from the request (public
        URL applied): remembered per scheme, server, path, query and Host, since a
        hook's senders call one URL and parsing it cost 3.6 µs a request (2026-12-02).
        At most ``URLS_KEPT`` are kept, each of a Host and query of at most
        ``URL_KEPT_BYTES`` (a stranger's long ones are read each time); past it the
        table starts over."""
        scope = request.scope
        host = scope_header(scope, b"host") or b""
        query = scope.get("query_string", b"")
        if len(host) + len(query) > URL_KEPT_BYTES:
            return self._url_of(request)
        key = (scope.get("scheme"), scope.get("server"), scope["path"], query, host)
        found = self._urls.get(key)
        if found is None:
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            found = self._urls[key] = self._url_of(request)
        return found

    def _url_of(self, request: Request) -> str:
        public = self.context.public_url
        if not public:
            return str(request.url)
        query = f"?{request.url.query}" if request.url.query else ""
        return f"{public.rstrip('/')}{request.url.path}{query}"

    async def handle(self, route: HttpRoute, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if not any(_media_matches(media, accepted) for accepted in route.content_types):
            accepted = " or ".join(route.content_types)
            return self.refused(
                None, Rejected("media-type", f"this endpoint accepts {accepted}", status=415)
            )
        try:
            self.authenticate_headers(route, request.headers)
        except Rejected as exc:
            return self.refused(None, exc)
        inbound = InboundRequest(
            route=route,
            body=await read_body(request, route.max_body_bytes),
            headers=request.headers,
            # Most hooks are called without a query: one shared, immutable empty one
            # (parsing even an empty query string cost 2.2 µs a request, 2026-12-02).
            query=request.query_params if request.scope.get("query_string") else _NO_QUERY,
            url=self._signed_url(request),
            media_type=media,
            content_type=content_type,
            # The client: the socket peer, or what a trusted proxy's
            # X-Forwarded-For names (uvicorn's proxy headers, see HttpServer).
            peer=request.client.host if request.client else None,
            message_id=uuid7(),
            received_at=datetime.now(UTC),
        )
        # Charged only now: junk refused above costs no real client its turn.
        try:
            self.admit_client(route, inbound.peer)
            await self.admit(route)
        except Rejected as exc:
            return self.refused(None, exc)
        refusal = await self._authenticated(inbound)
        if refusal is not None:
            return refusal
        try:
            await self.admit_authenticated(route)
        except Rejected as exc:
            return self.refused(None, exc)
        return await self._take(inbound)

    async def _authenticated(self, inbound: InboundRequest) -> Response | None:
        """None when :meth:`authenticate` lets the request in; else the answer.
        A large body is checked on a thread: the event loop serves everyone else."""
        try:
            if len(inbound.body) > INLINE_AUTH_BYTES:
                await asyncio.to_thread(self.authenticate, inbound)
            else:
                self.authenticate(inbound)
        except Rejected as exc:
            return await self._refuse(inbound, exc)
        return None

    async def _refuse(self, request: InboundRequest, error: Rejected) -> Response:
        if error.record and not await self._record_refusal(request, error):
            # Over the route's evidence budget (ingest.evidence): counted, and logged
            # once in a while by the budget; neither stored nor logged each time.
            return self.refused(request, _unrecorded(error))
        log.warning(
            "%s request refused: %s",
            self.name,
            error.reason,
            extra={"adapter": self.name, "path": request.route.path, "peer": request.peer},
        )
        return self.refused(request, error)

    async def _record_refusal(self, request: InboundRequest, error: Rejected) -> bool:
        """Keep bounded evidence of a refusal; False when over the budget."""
        try:
            kept = await self.handoff.refused(
                id=request.message_id,
                adapter=self.name,
                route=request.route.metric or self.name,
                reason=error.reason,
                detail=error.detail,
                body=request.body,
                media_type=request.media_type,
                metadata={
                    "path": request.route.path,
                    "peer": request.peer,
                    **self.dead_letter_metadata(request),
                    **error.metadata,
                },
            )
        except RetryLater:
            log.error("could not record the refused request", extra={"adapter": self.name})
            return True
        return kept is not None

    async def _dead_letter(
        self,
        request: InboundRequest,
        reason: str,
        detail: str,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> None:
        await self.handoff.dead_letter(
            id=request.message_id,
            adapter=self.name,
            reason=reason,
            detail=detail,
            raw=Blob.of(request.body, request.media_type),
            metadata={
                "path": request.route.path,
                "peer": request.peer,
                **self.dead_letter_metadata(request),
                **(metadata or {}),
            },
        )

    async def _normalized(self, request: InboundRequest) -> Normalized:
        """``normalize``, with an event the schema refuses (a normalizer that let a
        value through the schema does not take: a 265-character attachment type
        did, review of 2026-12-01) made a NormalizeError: the request is then kept
        or refused as malformed input is, instead of answered 500 with nothing kept."""
        try:
            return await self.normalize(request)
        except Stop:
            raise
        except Exception as exc:
            error = _as_malformed(exc, self.name)
            if error is exc:
                raise
            raise error from exc

    async def _take(self, request: InboundRequest) -> Response:
        started = time.perf_counter()
        try:
            try:
                normalized = await self._normalized(request)
            except NormalizeError as exc:
                if self.malformed == "reject":
                    status = self.malformed_status
                    return self.refused(request, Rejected(exc.reason, exc.detail, status=status))
                await self._dead_letter(request, exc.reason, exc.detail)
                return self.accepted(request, None)
            except Rejected as exc:
                return await self._refuse(request, exc)
            await self.handoff.deliver(normalized)
        except RetryLater as exc:
            return self.unavailable(exc)
        except Stop as exc:
            self.context.on_stop(f"{self.name}: {exc}")
            return self.unavailable(RetryLater(str(exc)))
        log.debug(
            "request taken",
            extra={"adapter": self.name, "ms": round((time.perf_counter() - started) * 1000, 1)},
        )
        return self.accepted(request, normalized)


def _schema_error(exc: ValidationError) -> NormalizeError:
    errors = exc.errors()
    where = ".".join(str(part) for part in errors[0]["loc"]) if errors else "?"
    why = errors[0]["msg"] if errors else exc.title
    return NormalizeError(
        "normalizer-error", f"the normalized message fails the schema at {where}: {why}"[:500]
    )


def _as_malformed(exc: Exception, adapter: str) -> Exception:
    """What a normalizer's exception is answered as (call it in the ``except``
    block): the error families and OSError (transient: a disk, a network; the sender
    retries) as themselves; a message the schema refuses, and anything else (a bug
    or a limit of the parser on this input: RecursionError on a mail nested
    thousands of parts deep), as a ``normalizer-error``, kept or refused as
    malformed input is, instead of a 500 its sender retries for days."""
    if isinstance(exc, NormalizeError | Rejected | RetryLater | OSError):
        return exc
    if isinstance(exc, ValidationError):
        return _schema_error(exc)
    log.exception("the normalizer failed on a message", extra={"adapter": adapter})
    return NormalizeError("normalizer-error", f"the normalizer failed: {type(exc).__name__}")


def _parse_step(adapter: HttpAdapter[Any], request: InboundRequest) -> Normalized:
    """``adapter.parse(request)``, its exceptions made what they are answered as
    (:func:`_as_malformed`) where they are raised: in a parse process, so that they
    cross back as themselves, which a ValidationError or a KeyError subclass would
    not."""
    try:
        return adapter.parse(request)
    except Exception as exc:
        error = _as_malformed(exc, adapter.name)
        if error is exc:
            raise
        raise error from None


def _parse_apart(
    cls: type[HttpAdapter[Any]], settings: object, request: InboundRequest
) -> Normalized:
    """In a parse process: ``parse`` of an instance made of the settings alone."""
    adapter = cls.__new__(cls)
    adapter.settings = settings
    return _parse_step(adapter, request)


class BasicAuthSettings(BaseSettings):
    """What a :class:`BasicAuthAdapter`'s settings class has (it subclasses this)."""

    username: str = Field(description="HTTP Basic user in the URL given to the provider.")
    password: SecretStr | None = Field(
        default=None, description="HTTP Basic password in that URL. Keep it in the env."
    )
    max_body_bytes: int = Field(default=30 * 1024 * 1024, ge=1024, description="Largest body.")


B = TypeVar("B", bound=BasicAuthSettings)


class BasicAuthAdapter(HttpAdapter[B]):
    """One route behind HTTP Basic, for a provider that cannot sign its requests.

    Wrong credentials answer 401, which providers retry (so a mistyped password
    loses nothing once fixed, where the provider retries 4xx at all); malformed
    input is kept as a dead letter, since the provider's retries would never succeed.
    """

    malformed = "dead-letter"
    path: ClassVar[str]
    media_type: ClassVar[str]
    provider: ClassVar[str]  # the provider's name, for messages
    on_unauthorized: ClassVar[str]  # what the provider does with a 401

    def __init__(self, settings: B, context: AdapterContext) -> None:
        super().__init__(settings, context)
        if settings.password is None:
            log.warning(
                "no %s password configured (SWITCHBOARD_%s_PASSWORD): every request to %s "
                "will be refused",
                self.provider,
                self.name.upper(),
                self.path,
            )

    def routes(self) -> list[HttpRoute]:
        return [
            HttpRoute(
                self.path,
                summary=f"{self.provider} inbound",
                content_types=(self.media_type,),
                max_body_bytes=self.settings.max_body_bytes,
                responses={
                    200: "Durable, or kept as a dead letter",
                    401: f"HTTP Basic credentials missing or wrong ({self.on_unauthorized})",
                    413: "Body too large",
                    503: f"Not durable; {self.provider} retries",
                },
            )
        ]

    def authenticate_headers(self, route: HttpRoute, headers: Mapping[str, str]) -> None:
        # Before the body: a stranger's 50 MB posts were read whole (24 of them:
        # +1.25 GB) only to be refused for their credentials (attacker review).
        require_basic_auth(
            headers,
            self.settings.username,
            self.settings.password,
            realm=f"switchboard-{self.name}",
            wrong_status=401,
        )

    def authenticate(self, request: InboundRequest) -> None:
        """Nothing left to check: HTTP Basic is all headers, and the cycle checked them
        (:meth:`authenticate_headers`) before it read the body."""


def mount_adapters(app: FastAPI, adapters: Sequence[HttpAdapter[Any]]) -> None:
    """Mount HTTP adapters, then a clear 404 for any other ``/webhooks/...`` path
    (last, so it never shadows an adapter's route)."""
    for adapter in adapters:
        adapter.mount(app)

    async def unknown(name: str) -> Response:
        return problem(
            404,
            "Not Found",
            f"nothing is served at /webhooks/{name}: no web hook of that name is configured "
            "and no enabled adapter has that route (see `switchboard adapters list`)",
        )

    app.add_api_route("/webhooks/{name:path}", unknown, methods=["POST"], include_in_schema=False)
