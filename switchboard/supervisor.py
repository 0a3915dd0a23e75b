"""Several processes serving one port: ``switchboard ingest http|smtp --workers N``.

One edge process is CPU-bound under one GIL (README, "Where an edge's time
goes"), so the edges scale out as processes. The supervisor binds the role's
ports (its HTTP port, and the SMTP port for ``smtp``) once per worker, with
``SO_REUSEPORT``: N listening sockets on one port, the kernel spreading new
connections among them by a hash of the client's address and port. Worker i
inherits socket i. The supervisor keeps every socket open, so when a worker dies
its queue is not lost: connections wait in that socket's backlog until the
successor, which inherits the same socket, accepts them.

Why not one shared socket, as gunicorn and uvicorn's ``--workers`` do: asyncio
accepts every pending connection at once when its socket is readable, so the
first worker to wake took most of a burst (measured with wrk's 64 keep-alive
connections: two workers gave 852-1,552 req/s from run to run, one of them idle
in the slow runs); with a socket each, both work.

Each worker is a whole ``switchboard ingest <role>`` process: its own Kafka
producer, its own spool file (``<role>.sqlite3`` for worker 0,
``<role>.<i>.sqlite3`` for worker i; a file lock keeps one owner per file), its
own parse workers. Limits a process counts by itself (connections and rate
per client, the spool's bounds, the evidence budget) are divided by N in each
worker (:func:`share`), so the fleet never allows more than the configuration
says; a client whose connections all land on one worker meets its 1/N first.

The supervisor holds no client and no thread. It starts worker 0 first and waits
until it is ready (it alone applies migrations and creates topics), then the
others; replaces a worker that dies (its successor reopens the same spool file and
drains it), with a backoff if it keeps dying (and, after a few quick deaths, with
its sockets closed meanwhile, so connections go to the workers that serve); kills
and replaces a worker whose event loop stops beating on its pipe; answers SIGTERM
or SIGINT by closing its copies of the sockets, sending one SIGTERM to every
worker and exiting when they all have (a second signal kills them). The workers
run in their own sessions (the terminal's Ctrl-C reaches only the supervisor),
ignore a repeated SIGTERM (systemd signals the whole group, then the supervisor
forwards its own) and die with the supervisor if it is SIGKILLed (Linux's
parent-death signal). One fleet per port: an abstract Unix socket named after the
port is the supervisor's lock (another process of the same user that sets
SO_REUSEPORT itself can still join the port's group: that is SO_REUSEPORT's rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from switchboard.broker import die_with_parent
from switchboard.errors import StartupError
from switchboard.limits import share
from switchboard.logs import WORKER_ENV
from switchboard.runtime import listening_socket

log = logging.getLogger(__name__)

# WORKER_ENV (``<index>/<count>``, set for a worker by its supervisor) is defined
# beside the logging that labels a worker's lines with it.
#: ``http=3,smtp=4``: the listening sockets a worker inherits, by name.
SOCKETS_ENV = "SWITCHBOARD_WORKER_SOCKETS"
#: The pipe a worker writes to once it serves, and then every BEAT_S.
BEAT_ENV = "SWITCHBOARD_WORKER_BEAT_FD"
#: The supervisor's pid: a worker started after its supervisor died exits at once.
PARENT_ENV = "SWITCHBOARD_WORKER_PARENT"
#: prometheus-client's multiprocess mode: every worker writes its values here and
#: any worker's /metrics serves the sum of all of them.
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: How long a fleet starting on a port another process holds waits for it. A fleet
#: SIGKILLed a moment ago takes its workers along (the parent-death signal), but a
#: worker inside an fsync dies only once the disk answers: a service manager that
#: restarts at once saw "Address already in use" (the fault suite, once, on a slow
#: machine) and spends its restart budget on it (systemd: 5 starts in 10 s).
PORT_WAIT_S = 10.0
#: Restart delays after a worker dies soon after its start: 0.5 s, doubling to 30 s.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
#: A worker that served this long before dying is restarted at once.
STABLE_S = 60.0
#: After this many quick deaths in a row a worker's sockets are closed until it
#: starts again (see Supervisor._check).
GIVE_UP_SOCKETS_AFTER = 3


def cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPU cores this process may use (the default number of workers): the cores it
    may run on, fewer under a cgroup v2 CPU quota (a container with ``cpus: 2`` on
    a 64-core host sees 64 cores but gets the time of 2)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    return count


#: A worker tells its supervisor it lives by writing to its pipe this often, from
#: its event loop (a loop that stops turning stops the beats too).
BEAT_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process knows about its place in the fleet."""

    index: int
    count: int
    sockets: Mapping[str, socket.socket] = field(default_factory=dict)
    beat_fd: int | None = None

    def share(self, limit: int) -> int:
        return share(limit, self.count)

    def beat(self) -> None:
        """Tell the supervisor this worker serves and its event loop turns. The
        pipe is non-blocking: a supervisor that does not read (stopped) never
        blocks the worker; a supervisor that is gone is not the worker's concern
        (the parent-death signal is)."""
        if self.beat_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.beat_fd, b".")

    async def beat_forever(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(BEAT_S)


def join_fleet() -> WorkerSpec | None:
    """In a worker process: its place in the fleet, and death with its supervisor
    (a SIGKILLed supervisor takes its workers along). None outside a fleet."""
    worker = current_worker(os.environ)
    if worker is not None:
        die_with_parent()
        parent = os.environ.get(PARENT_ENV)
        if parent and os.getppid() != int(parent):  # the supervisor died before prctl
            os._exit(1)
    return worker


def current_worker(env: Mapping[str, str]) -> WorkerSpec | None:
    """A worker's place in its fleet and its inherited sockets, from the
    environment its supervisor gave it; None when it was not started by one."""
    spec = env.get(WORKER_ENV)
    if not spec:
        return None
    index, count = (int(part) for part in spec.split("/"))
    sockets: dict[str, socket.socket] = {}
    for item in filter(None, env.get(SOCKETS_ENV, "").split(",")):
        name, fd = item.split("=")
        sockets[name] = socket.socket(fileno=int(fd))
    beat = env.get(BEAT_ENV)
    if beat:
        os.set_blocking(int(beat), False)
    return WorkerSpec(index, count, sockets, int(beat) if beat else None)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    beats: int | None = None  # the read end of the worker's pipe
    ready: bool = False
    started_at: float = 0.0
    last_beat: float = 0.0
    restart_at: float | None = None
    quick_deaths: int = 0
    terminated: bool = False  # sent SIGTERM: a second one is not sent


class Supervisor:
    """Binds the sockets, runs ``count`` workers, replaces the dead and the hung,
    stops them all."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        count: int,
        listen: Mapping[str, tuple[str, int]],
        metrics_dir: Path,
        shutdown_timeout_s: float,
        worker_timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        others: Callable[[], Iterable[int | None]] = tuple,
        port_wait_s: float = PORT_WAIT_S,
    ) -> None:
        """``others``: pids of this process's other children (the embedded broker),
        which the orphan reaper must leave to their own Popen."""
        self.others = others
        self.port_wait_s = port_wait_s
        self.command = list(command)
        self.env = dict(env or {})
        self.count = count
        self.listen = dict(listen)
        self.metrics_dir = metrics_dir
        self.shutdown_timeout_s = shutdown_timeout_s
        self.worker_timeout_s = worker_timeout_s
        self.start_timeout_s = start_timeout_s
        #: (name, worker index) -> that worker's listening socket of the port.
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.ports: dict[str, tuple[str, int]] = {}
        self.workers = [_Worker(i) for i in range(count)]
        self._locks: list[socket.socket] = []
        self._signals = 0
        self.failed = False  # every worker keeps dying

    # -- life cycle ----------------------------------------------------------

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._bind()
            self._prepare_metrics()
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for lock in self._locks:
                lock.close()

    def _supervise(self) -> int:
        log.info("starting workers", extra={"workers": self.count, "command": self.command[3:]})
        # Worker 0 alone first: it applies migrations and creates topics.
        first = self.workers[0]
        self._spawn(first)
        code = self._wait_ready(first)
        if code is not None:
            return code
        for worker in self.workers[1:]:
            self._spawn(worker)
        while not self._signals and not self.failed:
            for worker in self.workers:
                self._check(worker)
            self._reap_orphans()
            time.sleep(0.1)
        return 1 if self.failed else 0

    def _wait_ready(self, worker: _Worker) -> int | None:
        """None once ``worker`` serves; its exit code if it died first (1 if it
        did not start in time, 0 if a signal stopped the start)."""
        deadline = time.monotonic() + self.start_timeout_s
        while not self._signals:
            self._read_beats(worker)
            if worker.ready:
                return None
            code = worker.process.poll() if worker.process is not None else 1
            if code is not None:
                log.error("worker 0 could not start", extra={"exit_code": code})
                return code if code > 0 else 1
            if time.monotonic() > deadline:
                log.error("worker 0 not ready in time", extra={"timeout_s": self.start_timeout_s})
                return 1
            time.sleep(0.05)
        return 0

    def _check(self, worker: _Worker) -> None:
        now = time.monotonic()
        if worker.process is None:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._spawn(worker)
            return
        self._read_beats(worker)
        code = worker.process.poll()
        if code is None:
            self._watch(worker, now)
            return
        lived = now - worker.started_at
        served = worker.ready
        self._forget(worker)
        # A worker that never served (died or hung while starting) died quickly,
        # however long that took.
        stable = served and lived >= STABLE_S
        worker.quick_deaths = 0 if stable else worker.quick_deaths + 1
        delay = (
            0.0
            if worker.quick_deaths == 0
            else min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (worker.quick_deaths - 1))
        )
        worker.restart_at = now + delay
        if worker.quick_deaths >= GIVE_UP_SOCKETS_AFTER:
            # It keeps dying: the connections the kernel gives its sockets would
            # wait for a worker that does not come. Its sockets leave the port's
            # group (what waited in them is reset); its next try gets new ones,
            # bound but not listening: they join the group only when the worker
            # itself starts serving on them.
            self._close_sockets(worker.index)
            if all(w.quick_deaths >= GIVE_UP_SOCKETS_AFTER for w in self.workers):
                log.error("every worker keeps dying; the fleet stops")
                self.failed = True
        log.error(
            "worker died; starting another",
            extra={
                "worker": worker.index,
                "exit_code": code,
                "lived_s": round(lived, 1),
                "restart_in_s": delay,
            },
        )

    def _watch(self, worker: _Worker, now: float) -> None:
        """SIGKILL a worker that stopped beating (its loop hangs, or it was
        stopped) or that never became ready; _check then replaces it."""
        if worker.ready:
            silent = now - worker.last_beat
            if silent <= self.worker_timeout_s:
                return
            why, extra = "worker stopped answering; killing it", {"silent_s": round(silent, 1)}
        else:
            if now - worker.started_at <= self.start_timeout_s:
                return
            why, extra = "worker not ready in time; killing it", {}
        log.error(why, extra={"worker": worker.index, **extra})
        if worker.process is not None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    # -- one worker ------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        if self._signals:
            return  # stopping: no new workers
        listen = worker.quick_deaths < GIVE_UP_SOCKETS_AFTER
        try:
            sockets = self._sockets_of(worker.index, listen=listen)
            fds = {name: sock.fileno() for name, sock in sockets.items()}
        except OSError as exc:
            self._close_sockets(worker.index)
            log.error(
                "could not listen for a worker", extra={"worker": worker.index, "error": str(exc)}
            )
            worker.restart_at = time.monotonic() + RESTART_MAX_S
            return
        env = dict(os.environ) | self.env
        env.update(
            {
                WORKER_ENV: f"{worker.index}/{self.count}",
                SOCKETS_ENV: ",".join(f"{name}={fd}" for name, fd in fds.items()),
                PARENT_ENV: str(os.getpid()),
                METRICS_ENV: str(self.metrics_dir),
            }
        )
        worker.terminated = False
        read_end = write_end = -1
        try:
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            env[BEAT_ENV] = str(write_end)
            worker.process = subprocess.Popen(  # noqa: S603 - our own command line
                self.command,
                env=env,
                pass_fds=(*fds.values(), write_end),
                # Its own session: Ctrl-C is the supervisor's, which stops the
                # workers with one SIGTERM each.
                start_new_session=True,
            )
        except OSError as exc:  # no pipe, fork or exec failed (EMFILE, EAGAIN): try later
            if read_end >= 0:
                os.close(read_end)
            # No worker for a while: its sockets leave the port's group meanwhile.
            self._close_sockets(worker.index)
            log.error("could not start a worker", extra={"worker": worker.index, "error": str(exc)})
            worker.restart_at = time.monotonic() + RESTART_MAX_S
            return
        finally:
            if write_end >= 0:
                os.close(write_end)
        worker.beats = read_end
        worker.ready = False
        worker.started_at = worker.last_beat = time.monotonic()
        worker.restart_at = None
        log.info("worker started", extra={"worker": worker.index, "pid": worker.process.pid})

    def _read_beats(self, worker: _Worker) -> None:
        if worker.beats is None:
            return
        try:
            data = os.read(worker.beats, 4096)
        except BlockingIOError:
            return
        if not data:  # the worker closed it: it is exiting
            os.close(worker.beats)
            worker.beats = None
            return
        worker.last_beat = time.monotonic()
        if not worker.ready:
            worker.ready = True
            log.info("worker ready", extra={"worker": worker.index})

    def _forget(self, worker: _Worker) -> None:
        """After ``worker``'s process exited: its live gauges go, its counters stay."""
        if worker.process is not None:
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    worker.process.pid, str(self.metrics_dir)
                )
        if worker.beats is not None:
            os.close(worker.beats)
            worker.beats = None
        worker.process = None
        worker.ready = False

    def _reap_orphans(self) -> None:
        """As PID 1 (a container's entrypoint), reap the orphans that get
        reparented to us (a dead worker's parse process): they would stay zombies.
        Our own workers are left to their Popen, which reaps them."""
        if os.getpid() != 1:
            return
        ours = {w.process.pid for w in self.workers if w.process is not None}
        ours.update(pid for pid in self.others() if pid is not None)
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in ours:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(found.si_pid, 0)

    # -- sockets, metrics, signals ----------------------------------------------

    def _bind(self) -> None:
        for name, (host, wanted) in self.listen.items():
            try:
                if wanted:  # a live fleet on the port: refused at once, no wait
                    self._lock_port(host, wanted)
                port = self._probe(host, wanted)
                if not wanted:  # port 0: the kernel's choice, known only now
                    self._lock_port(host, port)
                self.ports[name] = (host, port)
                for index in range(self.count):
                    self._sockets_of(index)
            except OSError as exc:
                raise StartupError(
                    f"{name} could not listen on {host}:{wanted}: {exc.strerror or exc}"
                ) from exc

    def _probe(self, host: str, wanted: int) -> int:
        """Bind the port without SO_REUSEPORT and let it go: a plain listener on it
        (anything but a fleet) makes this fail. A port held by another process is
        tried again for ``port_wait_s`` (see PORT_WAIT_S); the port bound."""
        deadline = time.monotonic() + (self.port_wait_s if wanted else 0.0)
        said = False
        while True:
            try:
                with listening_socket(host, wanted) as probe:
                    port: int = probe.getsockname()[1]
                    return port
            except OSError as exc:
                late = time.monotonic() >= deadline
                if exc.errno != errno.EADDRINUSE or self._signals or late:
                    raise
                if not said:
                    log.warning(
                        "port in use by another process; waiting for it "
                        "(a fleet killed a moment ago?)",
                        extra={"port": f"{host}:{wanted}", "wait_s": self.port_wait_s},
                    )
                    said = True
            time.sleep(0.2)

    def _lock_port(self, host: str, port: int) -> None:
        """One fleet per port: an abstract Unix socket named after it, held for the
        supervisor's life (the kernel releases it when the process dies). With
        SO_REUSEPORT alone a second fleet started by mistake would share the port."""
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0switchboard-fleet {host}:{port}")
        except OSError as exc:
            lock.close()
            raise OSError(exc.errno, "another switchboard fleet serves this port") from exc
        self._locks.append(lock)

    def _sockets_of(self, index: int, *, listen: bool = True) -> dict[str, socket.socket]:
        """Worker ``index``'s sockets, bound again if they were closed (``listen``
        off: bound only; the worker's server listens on them when it starts)."""
        found = {}
        for name, (host, port) in self.ports.items():
            sock = self.sockets.get((name, index))
            if sock is None:
                sock = listening_socket(host, port, reuse_port=True, listen=listen)
                sock.set_inheritable(True)
                self.sockets[(name, index)] = sock
            found[name] = sock
        return found

    def _close_sockets(self, index: int) -> None:
        for key in [k for k in self.sockets if k[1] == index]:
            self.sockets.pop(key).close()

    def _prepare_metrics(self) -> None:
        # Values of an earlier run's workers (other pids) would be summed in.
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink(missing_ok=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("signal received, stopping workers", extra={"signal": signum})
            self._send(signal.SIGTERM)
        else:
            log.warning("second signal: killing workers", extra={"signal": signum})
            self._send(signal.SIGKILL)

    def _send(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is None or worker.process.poll() is not None:
                continue
            if sig == signal.SIGTERM:
                if worker.terminated:
                    continue
                worker.terminated = True
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    def _stop_all(self) -> None:
        """SIGTERM every worker still running, SIGKILL past the shutdown timeout."""
        # New connections are refused from now on, not queued for workers that
        # are leaving (each closes its own copy of its sockets as it stops).
        for key in list(self.sockets):
            self.sockets.pop(key).close()
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s + 5
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", extra={"worker": worker.index})
                worker.process.kill()
                worker.process.wait()
            self._forget(worker)


def worker_command(role: str, config: Path | None) -> list[str]:
    """The command line of one worker: the same role, without ``--workers``."""
    command = [sys.executable, "-m", "switchboard.cli", "ingest", role]
    if config is not None:
        command += ["--config", str(config)]
    return command
