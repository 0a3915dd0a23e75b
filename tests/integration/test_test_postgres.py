"""The suite's own check that its PostgreSQL answers (``tests/postgres.py``): it waits
out a server that is slow to come back, and still reports one that never does, or a
wrong database at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import postgres

pytestmark = pytest.mark.integration


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@contextmanager
def late_proxy(upstream: tuple[str, int]) -> Iterator[tuple[int, threading.Event]]:
    """A port on 127.0.0.3, bound at once, that refuses connections (Linux refuses
    them on a socket bound but not listening) until the event yielded is set, then
    forwards them to ``upstream``: a server that comes back while the check waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.3", 0))
    port = listener.getsockname()[1]
    opened = threading.Event()
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        opened.wait()
        listener.listen()
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(upstream)
            connections.extend((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, opened
    finally:
        stop.set()
        opened.set()
        thread.join(5)
        listener.close()
        for connection in connections:
            connection.close()


def _on_port(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_a_server_that_comes_back_within_the_patience_is_used(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    if parts.hostname is None or parts.port is None:
        pytest.skip("the embedded server listens on a Unix socket only")
    with late_proxy((parts.hostname, parts.port)) as (port, opened):
        url = _on_port(postgres_url, "127.0.0.3", port)
        assert postgres.unreachable(url) is not None  # refused: nothing listens yet
        threading.Timer(1.5, opened.set).start()
        started = time.monotonic()
        assert postgres.unreachable(url, patience_s=30) is None
        assert time.monotonic() - started >= 1.4  # answered only once it listened


def test_a_server_that_never_answers_is_reported_after_the_patience() -> None:
    started = time.monotonic()
    why = postgres.unreachable("postgresql://postgres@127.0.0.1:1/none", patience_s=1.2)
    waited = time.monotonic() - started
    assert why is not None
    assert 1.2 <= waited < 1.2 + 5 + 3


def test_a_wrong_database_is_reported_at_once(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    wrong = urlunsplit(parts._replace(path="/switchboard_no_such_database"))
    started = time.monotonic()
    why = postgres.unreachable(wrong, patience_s=30)
    assert why is not None
    assert "switchboard_no_such_database" in why
    assert time.monotonic() - started < 10
