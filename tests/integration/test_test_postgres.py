"""The suite's own check that its PostgreSQL answers (``tests/postgres.py``): it waits
out a server that is slow to come back, and still reports one that never does."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit

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
def late_proxy(upstream: tuple[str, int], delay_s: float) -> Iterator[int]:
    """A port on 127.0.0.3 that refuses connections for ``delay_s``, then forwards
    them to ``upstream``: a server that comes back while the check is waiting."""
    probe = socket.socket()
    probe.bind(("127.0.0.3", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there until the delay has passed
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        time.sleep(delay_s)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.3", port))
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
        yield port
    finally:
        stop.set()
        thread.join(5)
        for connection in connections:
            connection.close()


def test_a_server_that_comes_back_within_the_patience_is_used(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    if parts.hostname is None or parts.port is None:
        pytest.skip("the embedded server listens on a Unix socket only")
    with late_proxy((parts.hostname, parts.port), delay_s=1.5) as port:
        url = postgres_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.3:{port}", 1)
        assert postgres.unreachable(url) is not None  # refused: nobody listens yet
        started = time.monotonic()
        assert postgres.unreachable(url, patience_s=30) is None
        assert time.monotonic() - started < 30


def test_a_server_that_never_answers_is_reported_after_the_patience() -> None:
    started = time.monotonic()
    why = postgres.unreachable("postgresql://postgres@127.0.0.1:1/none", patience_s=1.2)
    assert why is not None
    assert "refused" in why
    assert time.monotonic() - started >= 1.2
