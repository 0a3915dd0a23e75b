"""A fleet of edge workers: how many, and each worker's part of the limits."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any, cast

import pytest

from ingest.errors import Rejected
from ingest.handoff import HandOff
from ingest.sdk import AdapterContext
from ingest.settings import SmtpSettings, WebhooksSettings
from ingest.smtp import SmtpAdapter
from ingest.webhook import WebhookAdapter
from switchboard.bootstrap import edge_workers, per_worker, spool_path
from switchboard.cli import build_parser
from switchboard.limits import share
from switchboard.logs import WORKER_ENV
from switchboard.settings import Settings
from switchboard.supervisor import (
    SOCKETS_ENV,
    Supervisor,
    WorkerSpec,
    cores,
    current_worker,
)


def test_a_share_never_adds_up_to_more_than_the_limit_and_is_at_least_one() -> None:
    assert [share(10, 2), share(7, 2), share(64, 3), share(1, 2), share(5, 1)] == [5, 3, 21, 1, 5]
    assert share(0, 2) == 0  # "none" stays none


def test_each_worker_gets_its_part_of_the_process_limits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert per_worker(settings, WorkerSpec(0, 1)) is settings
    half = per_worker(settings, WorkerSpec(1, 2))
    assert half.http.max_connections_per_client == settings.http.max_connections_per_client // 2
    assert half.http.max_body_in_flight == settings.http.max_body_in_flight // 2
    assert half.spool.max_bytes == settings.spool.max_bytes // 2
    assert half.spool.max_messages == settings.spool.max_messages // 2
    assert half.evidence.per_minute == settings.evidence.per_minute // 2
    # Per refused request, not a budget: the same in every worker.
    assert half.evidence.max_bytes == settings.evidence.max_bytes
    settings.evidence.per_minute = 0
    assert per_worker(settings, WorkerSpec(1, 2)).evidence.per_minute == 0
    # The caller's settings are left as they were.
    assert settings.http.max_connections_per_client == 64


def test_worker_zero_keeps_the_single_process_spool_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    http = frozenset({"http"})
    assert spool_path(settings, http).name == "http.sqlite3"
    assert spool_path(settings, http, 0).name == "http.sqlite3"
    assert spool_path(settings, http, 3).name == "http.3.sqlite3"


def test_a_cpu_quota_caps_the_default(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of time: 2 processes
    assert cores(cpu_max) == min(2, len(os.sched_getaffinity(0)))
    cpu_max.write_text("50000 100000\n")
    assert cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert cores(cpu_max) == len(os.sched_getaffinity(0))
    assert cores(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_how_many_workers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert edge_workers(settings, "http", None) == cores()
    assert edge_workers(settings, "http", 3) == 3
    settings.http.workers = 4
    assert edge_workers(settings, "http", None) == 4
    assert edge_workers(settings, "http", 1) == 1
    settings.adapters["smtp"] = {"workers": 5}
    assert edge_workers(settings, "smtp", None) == 5


@pytest.mark.parametrize("given", ["0", "65", "two"])
def test_the_workers_option_is_checked(given: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "http", "--workers", given])


def test_only_the_edges_that_listen_take_workers() -> None:
    assert build_parser().parse_args(["ingest", "smtp", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "imap", "--workers", "2"])


def test_a_worker_reads_its_place_and_its_sockets_from_the_environment() -> None:
    assert current_worker({}) is None
    listener = socket.create_server(("127.0.0.1", 0))
    fd = os.dup(listener.fileno())
    try:
        worker = current_worker({WORKER_ENV: "1/2", SOCKETS_ENV: f"http={fd}"})
        assert worker is not None
        assert (worker.index, worker.count) == (1, 2)
        assert worker.sockets["http"].getsockname() == listener.getsockname()
        assert worker.share(10) == 5
        worker.sockets["http"].close()
    finally:
        listener.close()


def _context(workers: int) -> AdapterContext:
    return AdapterContext(cast(HandOff, None), workers=workers)


def test_an_smtp_worker_allows_its_part_of_the_sessions_per_client() -> None:
    settings = SmtpSettings(domains=["example.com"], max_sessions_per_client=4, verify=False)
    alone = SmtpAdapter(settings, _context(1))
    answers = [alone.admit("192.0.2.1") for _ in range(5)]
    assert answers[:4] == [None] * 4
    assert answers[4] is not None
    one_of_two = SmtpAdapter(settings, _context(2))
    assert one_of_two.admit("192.0.2.1") is None
    assert one_of_two.admit("192.0.2.1") is None
    assert one_of_two.admit("192.0.2.1") is not None  # 421: its two of the four are taken


def test_a_hook_worker_allows_its_part_of_the_burst() -> None:
    hooks = WebhooksSettings.model_validate(
        {
            "hooks": [
                {
                    "name": "form",
                    "auth": {"kind": "none"},
                    "map": {"email": "email", "text": "text"},
                    "rate_per_s": 0.001,
                    "burst": 6,
                }
            ]
        }
    )

    def admitted(adapter: WebhookAdapter) -> int:
        route = adapter.routes()[0]
        count = 0
        for _ in range(10):
            try:
                asyncio.run(adapter.admit(route))
                count += 1
            except Rejected:
                pass
        return count

    assert admitted(WebhookAdapter(hooks, _context(1))) == 6
    assert admitted(WebhookAdapter(hooks, _context(2))) == 3
    assert admitted(WebhookAdapter(hooks, _context(3))) == 2


class _Exited:
    """A worker process that has exited with ``code``."""

    pid = 999_999

    def __init__(self, code: int) -> None:
        self.code = code

    def poll(self) -> int:
        return self.code


def _supervisor(tmp_path: Path) -> Supervisor:
    supervisor = Supervisor(
        ["true"],
        count=2,
        listen={"http": ("127.0.0.1", 0)},
        metrics_dir=tmp_path / "metrics",
        shutdown_timeout_s=1,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    supervisor.ports = {"http": ("127.0.0.1", port)}
    return supervisor


def _died(supervisor: Supervisor, index: int, *, served: bool, lived_s: float) -> None:
    worker = supervisor.workers[index]
    worker.process = cast(Any, _Exited(-9))
    worker.ready = served
    worker.started_at = time.monotonic() - lived_s
    supervisor._check(worker)


def test_a_worker_that_never_served_died_quickly_however_long_it_hung(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path)
    _died(supervisor, 0, served=True, lived_s=600)
    assert supervisor.workers[0].quick_deaths == 0  # served, then died: restarted at once
    _died(supervisor, 0, served=False, lived_s=600)
    assert supervisor.workers[0].quick_deaths == 1
    _died(supervisor, 0, served=True, lived_s=5)
    assert supervisor.workers[0].quick_deaths == 2


def test_after_three_quick_deaths_a_workers_sockets_leave_the_port(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path)
    for index in (0, 1):
        supervisor._sockets_of(index)
    listening = supervisor.sockets[("http", 1)]
    assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    for _ in range(3):
        _died(supervisor, 1, served=False, lived_s=1)
    assert ("http", 1) not in supervisor.sockets
    assert listening.fileno() == -1  # closed
    assert not supervisor.failed  # worker 0 still serves
    # Its next try: bound, not listening, until its own server listens on it.
    again = supervisor._sockets_of(1, listen=False)["http"]
    assert again.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    assert again.getsockname() == supervisor.ports["http"]
    for _ in range(3):
        _died(supervisor, 0, served=False, lived_s=1)
    assert _failed(supervisor)  # every worker keeps dying: the fleet stops
    for sock in supervisor.sockets.values():
        sock.close()


def _failed(supervisor: Supervisor) -> bool:
    return supervisor.failed
