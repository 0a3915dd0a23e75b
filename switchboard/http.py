"""The HTTP app shell: health and readiness. Stages mount their routes on it."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from switchboard.limits import (
    BodyBudget,
    BodyLimitMiddleware,
    BodyLimits,
    HttpLimitSettings,
    scope_header,
)
from switchboard.metrics import RECEIVED, child, exposition, http_rejected

# A readiness check raises (any exception) when its dependency is unavailable.
Check = Callable[[], None]


class Degraded(Exception):
    """Raised by a check whose dependency is away while the process still does its
    job another way (an edge spooling while Kafka is away): reported, still ready."""


@dataclass
class Readiness:
    """Named blocking checks, run off the event loop, results cached briefly so a
    busy load balancer cannot turn /readyz into load on Kafka or the database."""

    checks: dict[str, Check] = field(default_factory=dict)
    cache_s: float = 1.0
    timeout_s: float = 2.0
    _cached: tuple[float, dict[str, str]] | None = None

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def evaluate(self) -> dict[str, str]:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < self.cache_s:
            return self._cached[1]

        async def run(check: Check) -> str:
            try:
                await asyncio.wait_for(asyncio.to_thread(check), self.timeout_s)
            except TimeoutError:
                return f"timeout after {self.timeout_s}s"
            except Degraded as exc:
                return f"degraded: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                return f"{type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[n]) for n in names))
        status = dict(zip(names, results, strict=True))
        self._cached = (now, status)
        return status


PROBLEM = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """An RFC 9457 problem response."""
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def unavailable(retry_after_s: int) -> JSONResponse:
    """503: nothing was made durable; the sender should retry after ``retry_after_s``."""
    return problem(
        503,
        "Temporarily unavailable",
        "the message could not be stored; retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


async def counted(adapter: str, answer: Awaitable[Response]) -> Response:
    """An HTTP adapter's answer, counted as received and, if refused, by reason."""
    child(RECEIVED, adapter).inc()
    try:
        response = await answer
    except BodyTooLarge:
        http_rejected(adapter, 413)
        raise
    if response.status_code >= 400:
        http_rejected(adapter, response.status_code)
    return response


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (without buffering it) anything over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


#: A hook's endpoint: the request in, the answer out (``HttpAdapter._endpoint``).
Endpoint = Callable[[Request], Awaitable[Response]]


class DirectPosts:
    """POSTs to a hook's own path go straight to its endpoint, past Starlette's
    exception middleware, router and FastAPI's per-route wrapper (dependencies,
    validation): a hook endpoint takes the raw request and needs none of them.

    Everything outside stays in the way: the server's error middleware, the
    trusted-host check and the body limits. Errors the app has handlers for (a
    body over the limit, an HTTP error) are answered by the same handlers. Any
    other method or path (a GET, a trailing slash, the catch-all 404 under
    ``/webhooks/``) goes through the router as before, and the OpenAPI document
    still comes from the routes. On one `ingest http` process this took the JSON
    hook from 0.81-0.85 to 0.70-0.74 ms of CPU a request (README "HTTP ingest").
    """

    def __init__(
        self,
        app: ASGIApp,
        endpoints: Mapping[str, Endpoint],
        handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (
            self.endpoints.get(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # to the server error middleware, as from the router
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The handler Starlette's exception middleware would pick: by status code for
        an HTTP error, else by class; a catch-all (``Exception``, 500) is left to the
        server error middleware, which logs the error before answering."""
        if isinstance(exc, StarletteHTTPException) and exc.status_code in self.handlers:
            return self.handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.handlers:
                return self.handlers[cls]
        return None


def _telemetry() -> dict[str, Any]:
    """FastAPI's OpenTelemetry (0.16x) off unless a provider is set up when the app is
    built (``opentelemetry-instrument switchboard ...``) or FastAPI is to set them up
    (``FASTAPI_OTEL_AUTO_CONFIGURE=true``); a provider set up later is not seen.
    Switchboard counts in Prometheus; FastAPI asks OpenTelemetry on every request
    whether a provider has appeared since, by reading the environment: 3 µs a
    request (2026-12-02)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # an older FastAPI: no telemetry of its own
    probe = FastAPI()
    if getattr(probe, "_telemetry", {}).get("auto_configure"):
        return {}  # FASTAPI_OTEL_AUTO_CONFIGURE: FastAPI sets the providers up itself
    wanted = getattr(getattr(probe, "_native_telemetry", None), "enabled", None)
    if wanted is not None and wanted():
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(readiness: Readiness, limits: HttpLimitSettings | None = None) -> FastAPI:
    """The app shell. ``app.state.body_limits`` is the one table of per-route body
    limits: HTTP adapters register their routes' limits in it when mounted;
    ``app.state.body_budget`` counts the body bytes all requests hold at once."""
    limits = limits or HttpLimitSettings()
    app = FastAPI(
        title="Switchboard",
        description="Inbound messages from every channel, one contact, one owner.",
        version="0.1.0",
        **_telemetry(),
    )
    body_limits = BodyLimits(default=limits.max_body_bytes)
    app.state.body_limits = body_limits
    # The body bytes this process's requests hold at once (BodyLimitMiddleware).
    app.state.body_budget = BodyBudget(limits.max_body_in_flight)
    # Filled by HTTP adapters when mounted (HttpAdapter.mount); inside the body limits.
    app.state.direct_posts = {}
    app.add_middleware(
        DirectPosts,
        endpoints=app.state.direct_posts,
        handlers=app.exception_handlers,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        limits=body_limits,
        body_timeout_s=limits.body_timeout_s,
        budget=app.state.body_budget,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {404: "Not Found", 405: "Method Not Allowed"}
        return problem(
            exc.status_code,
            titles.get(exc.status_code, "Error"),
            str(exc.detail),
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        detail = "; ".join(
            f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in errors
        )
        return problem(422, "Invalid request", detail or "invalid request", errors=jsonable(errors))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return problem(413, "Payload too large", f"the body is over {exc.limit} bytes")

    @app.get("/healthz", tags=["operations"], summary="The process is running")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Dependencies are reachable")
    async def readyz() -> JSONResponse:
        checks = await readiness.evaluate()
        ready = all(result == "ok" or result.startswith("degraded:") for result in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics of this process (of every worker, under a supervisor)",
    )
    def metrics() -> Response:
        body, media_type = exposition()
        return Response(body, media_type=media_type)

    return app


def jsonable(value: object) -> object:
    """Round-trip through JSON so exception details (bytes, objects) serialize."""
    return json.loads(json.dumps(value, default=str))


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Probes and scrapers reach a pod by its address, whatever the configured names.
_ANY_HOST_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _host_name(header: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:8080`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


#: Host headers whose verdict TrustedHosts remembers.
HOSTS_KEPT = 64


class TrustedHosts:
    """Answer only requests whose ``Host`` is one of ours (400 otherwise): a page
    served under a name an attacker controls (DNS rebinding) gets nothing, and
    links built from the Host header cannot be poisoned. Health and metrics answer
    any host. A leading ``*.`` allows subdomains."""

    def __init__(self, app: Any, hosts: Iterable[str]) -> None:  # noqa: ANN401 - an ASGI app
        self.app = app
        names = {h.strip().lower().strip("[]") for h in hosts if h.strip()}
        self.exact = {n for n in names if not n.startswith("*.")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        # Each Host header's verdict, as sent (a server answers to a few names: its
        # own, its address, a proxy's): 2 µs a request less (2026-12-02). The
        # HOSTS_KEPT most recent, each of at most 255 bytes (a DNS name's longest); a
        # longer header is judged each time.
        self._verdict = functools.lru_cache(maxsize=HOSTS_KEPT)(self._judge)

    def allowed(self, header: str) -> bool:
        name = _host_name(header)
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    def _judge(self, header: bytes) -> bool:
        return self.allowed(header.decode("latin-1"))

    def _allowed_raw(self, header: bytes) -> bool:
        return self._verdict(header) if len(header) <= 255 else self._judge(header)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] not in ("http", "websocket") or scope["path"] in _ANY_HOST_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._allowed_raw(scope_header(scope, b"host") or b""):
            response = problem(400, "Bad Request", "this server does not answer to that host name")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
