"""Running components together: start in order, stop in reverse, bounded.

A component is anything with a ``name`` and async ``start``/``stop``: the HTTP
server, the channel adapters (SMTP server, IMAP pollers), the spool drainer, the
consumers (router, queue sink, archive), the journal keeper and the blob collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Protocol

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from switchboard.errors import StartupError
from switchboard.limits import ConnectionGuard, HttpLimitSettings, guarded_protocol

log = logging.getLogger(__name__)


class Component(Protocol):
    """``edge = True`` on a component that accepts input from outside (a listener,
    a poller): those stop first at shutdown, so nothing new arrives while the
    rest (drainer, router, sinks) finish and commit."""

    @property
    def name(self) -> str:
        """Shown in logs and in shutdown warnings."""

    async def start(self) -> None:
        """Return once the component is serving; raise if it cannot."""

    async def stop(self) -> None:
        """Stop accepting, finish in-flight work, release resources."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The runtime owns SIGTERM/SIGINT for every component; uvicorn must not
        # install its own handlers or re-raise the signal after shutdown.
        yield


def listening_socket(
    host: str, port: int, backlog: int = 2048, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A listening TCP socket whose accepted connections get TCP_NODELAY
    (``reuse_port``: one of several sockets of one port, SO_REUSEPORT; ``listen``
    off: bound only, for a server that listens on it later).

    asyncio turns Nagle off only for sockets whose ``proto`` is IPPROTO_TCP;
    ``socket.create_server`` leaves it 0, and every kept-alive HTTP response
    then waited for the client's delayed ACK: 44 ms a request (measured).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """FastAPI on uvicorn inside the runtime's event loop."""

    edge = True

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        name: str = "http",
        limits: HttpLimitSettings | None = None,
        *,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a listening socket to serve instead of binding ``host:port``
        (a worker's, inherited from its supervisor)."""
        self.name = name
        self._sock = sock
        self.app = app
        self.host = host
        self.port = port
        limits = limits or HttpLimitSettings()
        self.guard = ConnectionGuard(
            max_per_client=limits.max_connections_per_client,
            header_timeout_s=limits.header_timeout_s,
            trusted=limits.networks(),
            max_header_bytes=limits.max_header_bytes,
            send_timeout_s=limits.send_timeout_s,
        )
        self._server = _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=3,
                http=guarded_protocol(AutoHTTPProtocol, self.guard),
                # No route is a websocket, and an upgraded connection leaves the
                # guard's protocol without its connection_lost: its slot under
                # max_connections_per_client was never given back, and 64 upgrade
                # requests locked an address out until a restart (attacker review,
                # 2026-12-03).
                ws="none",
                # uvicorn's own X-Forwarded-For handling (walks the list from the
                # right past trusted proxies), with our list, not FORWARDED_ALLOW_IPS.
                proxy_headers=bool(limits.trusted_proxies),
                forwarded_allow_ips=",".join(limits.trusted_proxies),
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bind here rather than in uvicorn: uvicorn answers a bind failure with
        # sys.exit() from inside its task, which would tear down the whole loop.
        try:
            sock = self._sock or listening_socket(self.host, self.port)
        except OSError as exc:
            raise StartupError(
                f"HTTP server could not listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="uvicorn")
        while not self._server.started:
            if self._task.done():
                with contextlib.suppress(SystemExit, Exception):
                    self._task.result()
                raise StartupError(f"HTTP server failed to start on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        log.info("http listening", extra={"url": f"http://{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5)
        except TimeoutError:
            self._server.force_exit = True
            await self._task


class ThreadedComponent:
    """A blocking loop (kafka-python consumers) in a thread of its own, as a component.

    Subclasses implement :meth:`_run`, set ``self._ready`` once serving and return
    when ``self._stop`` is set; :meth:`prepare` runs first, in the caller.
    """

    name = "threaded"

    #: /readyz reports a loop that has not called :meth:`beat` for this long.
    stuck_after_s = 120.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_error: BaseException | None = None
        self.last_beat = time.monotonic()
        self.last_commit: float | None = None

    def beat(self) -> None:
        """The loop is making progress (call it each turn, and while waiting)."""
        self.last_beat = time.monotonic()

    def liveness(self) -> str | None:
        """None while the loop runs and beats; else what is wrong, for /readyz."""
        if self._thread is None or self._stop.is_set():
            return None  # not started yet, or stopping on purpose
        if not self._thread.is_alive():
            return f"{self.name}: its thread has stopped"
        silent = time.monotonic() - self.last_beat
        if silent > self.stuck_after_s:
            return f"{self.name}: no progress for {silent:.0f} s"
        return None

    def prepare(self) -> None:
        """Work before the loop starts (migrating state, emptying a read model)."""

    def _run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self.prepare()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        while not self._ready.is_set():
            if not self._thread.is_alive():
                raise StartupError(f"{self.name} failed to start: {self.start_error!r}")
            await asyncio.sleep(0.02)
        log.info("component started", extra={"component": self.name})

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 15.0)

    def run_forever(self) -> None:
        """Run in the calling thread until :meth:`request_stop` (tests)."""
        self.prepare()
        self._run()

    def request_stop(self) -> None:
        self._stop.set()


async def run_components(
    components: Sequence[Component],
    *,
    stop: asyncio.Event,
    shutdown_timeout_s: float,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Start every component, wait for ``stop``, then stop them: edges first, then
    the rest, each group in reverse start order, within ``shutdown_timeout_s``.

    ``on_started`` runs once every component is serving (readiness uses it).
    """
    started: list[Component] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
        log.info("switchboard running", extra={"components": [c.name for c in started]})
        if on_started is not None:
            on_started()
        await stop.wait()
        log.info("stopping")
    finally:
        deadline = time.monotonic() + shutdown_timeout_s
        edges = [c for c in reversed(started) if getattr(c, "edge", False)]
        for component in edges + [c for c in reversed(started) if c not in edges]:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(component.stop(), remaining)
            except TimeoutError:
                log.error("component did not stop in time", extra={"component": component.name})
            except Exception:
                log.exception("component failed to stop", extra={"component": component.name})


def install_signal_handlers(
    stop: asyncio.Event, on_force: Callable[[], None], *, force_on_repeat: bool = True
) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second one: ``on_force`` (exit now),
    unless ``force_on_repeat`` is off (a supervised worker: only logged)."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set() and not force_on_repeat:
            log.info("signal received again; still stopping", extra={"signal": sig.name})
            return
        if stop.is_set():
            log.warning("second signal: exiting without waiting", extra={"signal": sig.name})
            on_force()
            return
        log.info("signal received, shutting down", extra={"signal": sig.name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
