"""Normalization off the server's event loop and, optionally, off its process.

Parsing MIME is CPU work under the GIL. In-process (``workers=0``) it runs on a
thread; with ``workers >= 1`` it runs in worker processes, each a fresh
interpreter (forking a process that runs Kafka client threads is unsafe) started
with :mod:`subprocess` rather than multiprocessing's ``spawn``: spawn runs the
parent's ``__main__`` again in the child, and for a server that is the
`switchboard` console script, whose imports (the CLI, the settings, every
adapter) cost 0.7-0.8 s of CPU a process for nothing it parses.

Each worker is connected to the server by one socket pair: the event loop
writes length-prefixed pickled calls to it and reads the results back as they
come, without a thread. (``ProcessPoolExecutor`` carried each call through a
queue, a management thread and a feeder thread, each taking the GIL in turn:
14.5% of the SMTP server's GIL samples went to that plumbing, 2026-11-29.)

A worker runs its calls one at a time, in the order they were sent, so when it
dies the call at the head of its line is the one that killed it; the calls
queued behind it were not started and go to the fresh worker without counting
against them. The culprit is retried once on a fresh worker, after the calls that were
waiting (one poison delays them by one time limit, not two), and only then
reported as :class:`WorkerCrashed`, so the adapter can keep the raw bytes and
dead-letter it: one poison message never costs another sender its message. A
call that runs longer than ``timeout_s`` (a message built to make the parser
crawl) is treated the same way: the worker is killed and replaced.

Every reply carries its call's number; a reply that does not match the head of
the line, or cannot be read, is treated as the worker dying. When a fresh
worker cannot be started, the waiting calls go to the workers still alive and
the start is retried with a growing pause; with no worker at all, calls fail
with :class:`ParserUnavailable` (a retry-later answer, not a dead letter).

A long parse holds only itself up: when a worker has spent ``spare_after_s`` on one
call with others waiting behind it (a 25 MB mail, or a stranger's mail built to make
the parser crawl until ``timeout_s``), the pool starts a spare process, up to one per
worker, and gives it the waiting calls: those not yet written to the busy worker move,
and those already in its socket are sent again (whichever answer comes first is
taken; a parse has no side effects, and a crash's retry already runs a call twice).
A spare that has been idle for ``spare_idle_s`` while nothing is stuck is stopped.
Before 2026-12-02 one such mail held every other mail of its server for up to the
whole ``timeout_s`` (60 s by default for SMTP).

A worker may be bounded in memory (``memory_mb``: its address space, ``RLIMIT_AS``).
What a stranger's message makes the parser allocate is then the parse process's
problem, not the host's: a 25 MB mail of header lines or HTML took 855-923 MB here
(2026-12-01), and on a small host the kernel's OOM killer picks whichever process
it likes, the server or the broker among them. A call that runs out of it fails
with :class:`OverMemory` (a :class:`WorkerCrashed`: the adapters keep the raw bytes
and dead-letter it, ``normalizer-error``); the process goes on with the next. Native
code that runs out instead aborts the process (the HTML sanitizer, nh3, does): that
is a crash like any other, the call is tried once more on a fresh process and then
dead-lettered the same way.

A worker belongs to the server that started it: it leaves the terminal's
process group (Ctrl-C is for the server, which then stops the pool itself) and
dies with the server (Linux's parent-death signal), so a SIGKILLed server does
not leave parsers behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from ingest.errors import RetryLater
from switchboard.broker import die_with_parent

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEADER = struct.Struct("!Q")
#: Calls written to a worker before their turn: the one it parses and the next.
_AHEAD = 2


class WorkerCrashed(RuntimeError):
    """The input crashed (or outlasted the time limit of) a worker process twice."""


class OverMemory(WorkerCrashed):
    """The input needed more memory than a parse process may take (``memory_mb``)."""


class ParserUnavailable(RetryLater):
    """No parse process is running and none could be started: the sender retries."""


class _Unpicklable(RuntimeError):
    """A worker's exception that could not cross back as itself."""


def _read_exactly(stream: Any, size: int) -> bytes | None:  # noqa: ANN401 - a file object
    data = stream.read(size)
    if len(data) < size:
        return None
    return cast("bytes", data)


def _failure(seq: int, exc: BaseException) -> bytes:
    """The reply for a call that raised: the exception itself if it survives a round
    trip through pickle (an exception class with a custom ``__init__`` often does
    not), else its text."""
    try:
        reply = pickle.dumps((seq, False, exc), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(reply)  # noqa: S301 - our own bytes, just made
    except Exception:  # noqa: BLE001 - any exception that cannot cross as itself
        failure = _Unpicklable(f"{type(exc).__name__}: {exc}")
        reply = pickle.dumps((seq, False, failure), protocol=pickle.HIGHEST_PROTOCOL)
    return reply


#: What a parse process runs: the parent's import path first (an adapter or a test
#: module the calls name must import as it does in the server), then this module.
_CHILD = (
    "import json, socket, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from ingest.workers import _serve; "
    "_serve(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4]))"
)


class _Process:
    """A parse process: the part of multiprocessing's Process API the pool uses."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; negative: the signal that ended it."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        self._popen.kill()  # a no-op once it was reaped

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)


def _start_process(theirs: socket.socket, memory_mb: int = 0) -> _Process:
    fd = theirs.fileno()
    path = json.dumps([os.fspath(p) for p in sys.path if isinstance(p, str | os.PathLike)])
    # The interpreter's own flags (-X dev, -W error, -O, -I) go along, as multiprocessing
    # passed them; the helper is the standard library's, used by multiprocessing too.
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    # -P: `-c` would put the working directory first on the path, ahead of the
    # standard library, for the imports before the server's path replaces it: a
    # json.py in the server's directory stopped every parse process from starting.
    popen = subprocess.Popen(  # noqa: S603 - our interpreter, our code, no shell
        [
            sys.executable,
            *flags,
            "-P",
            "-c",
            _CHILD,
            path,
            str(fd),
            str(os.getpid()),
            str(memory_mb),
        ],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
    )
    return _Process(popen)


def _serve(  # pragma: no cover - runs in the worker
    sock: socket.socket, parent: int, memory_mb: int = 0
) -> None:
    """The worker's loop: one call at a time, in order, until the server hangs up."""
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):  # a platform without RLIMIT_AS
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Its own session: the terminal's SIGINT reaches only the server, which shuts
    # the pool down in order, instead of a KeyboardInterrupt traceback here.
    with contextlib.suppress(OSError):
        os.setsid()
    die_with_parent()
    if os.getppid() != parent:  # the server died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stream = sock.makefile("rwb")
    while True:
        header = _read_exactly(stream, _HEADER.size)
        if header is None:
            return  # the server closed its end: stop
        body = _read_exactly(stream, _HEADER.unpack(header)[0])
        if body is None:
            return
        # The server's own pickles over a socket pair only the two ends hold.
        seq, fn, args = pickle.loads(body)  # noqa: S301
        reply: bytes | None
        try:
            reply = pickle.dumps((seq, True, fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            # Answered once out of the except block: the exception, its traceback and
            # the frames holding what the input made the parser allocate are freed by
            # then. Pickled inside it, the reply itself ran out of memory now and then
            # (review of 2026-12-01: 1 header bomb in 12 killed the process).
            reply = None
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the caller
            reply = _failure(seq, exc)
        if reply is None:
            reply = _failure(seq, MemoryError("the parse process's memory limit"))
        stream.write(_HEADER.pack(len(reply)))
        stream.write(reply)
        stream.flush()


def _as_exception(value: object) -> Exception:
    """What a caller's future can carry: asyncio refuses StopIteration (it would end
    the awaiting coroutine silently), and a reply could name anything."""
    if isinstance(value, Exception) and not isinstance(value, StopIteration | StopAsyncIteration):
        return value
    return RuntimeError(f"parser raised {type(value).__name__}: {value}")


@dataclass(eq=False)
class _Call:
    seq: int
    fn: Callable[..., Any]
    args: tuple[object, ...]
    future: asyncio.Future[Any]
    crashes: int = 0
    #: The pool's own "are you up?" call, first in a new worker's line: the time a
    #: process takes to start does not count against the first message's limit.
    internal: bool = False

    def encoded(self) -> bytes | None:
        """The call as written to a worker, pickled each time it is written (rarely
        twice: a second try), never kept: a call waiting or being parsed holds its
        arguments, not copies of them (a 30 MB mail was held three times: its bytes,
        its pickle, and the pickle kept for a retry). None when it cannot be
        pickled (its future then holds the error)."""
        try:
            return pickle.dumps((self.seq, self.fn, self.args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - the caller's arguments, its error
            if not self.future.done():
                self.future.set_exception(exc)
            return None


@dataclass(eq=False)
class _Worker:
    process: _Process
    writer: asyncio.StreamWriter
    reader_task: asyncio.Task[None] | None = None
    line: collections.deque[_Call] = field(default_factory=collections.deque)
    #: Calls not yet written to it: only _AHEAD are in its socket at a time, so a
    #: call whose sender hung up meanwhile is dropped here, unparsed, its bytes freed.
    queue: collections.deque[_Call] = field(default_factory=collections.deque)
    #: When the call at the head of the line was sent or reached the head.
    head_since: float = 0.0
    dead: bool = False
    #: The call at the head when the watchdog killed the worker for its time.
    timed_out: _Call | None = None
    #: Answered when the process has started and answered its first call.
    ready: asyncio.Future[Any] | None = None
    #: Started beside a stuck worker, and stopped once idle (not replaced in a slot).
    spare: bool = False
    #: When the watchdog last saw it with work (a spare is stopped when idle long).
    busy_at: float = 0.0


class ParserPool:
    #: As a component of the runtime (the HTTP process's pool): started before the
    #: server, stopped after it.
    name = "parsers"
    edge = False

    def __init__(
        self,
        workers: int = 0,
        timeout_s: float = 60.0,
        memory_mb: int = 0,
        *,
        spare_after_s: float = 2.0,
        spare_idle_s: float = 30.0,
        spares: int | None = None,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb  # each process's address space; 0: unbounded
        #: A call running this long with others waiting behind it starts a spare.
        self.spare_after_s = min(spare_after_s, timeout_s / 2)
        self.spare_idle_s = spare_idle_s
        #: At most this many spares at once (default: one per worker; 0: none).
        self.spares = workers if spares is None else spares
        self._spare_task: asyncio.Task[None] | None = None
        self._slots: list[_Worker] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._seq = 0
        #: Calls that arrived while no worker was alive (one being replaced).
        self._backlog: collections.deque[_Call] = collections.deque()
        #: Calls that crashed (or outlasted) a worker once, to be tried once more after
        #: the calls waiting (taken with them by _take_waiting, last).
        self._retries: collections.deque[_Call] = collections.deque()
        #: The modules of the functions called so far: a replacement process imports
        #: them while starting (time that does not count), not on its first message,
        #: whose limit the imports could eat on a loaded machine (a test saw a good
        #: mail killed twice for it and dead-lettered).
        self._modules: set[str] = set()
        #: No worker is alive and the last start failed: calls fail at once.
        self._unavailable = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def warm_up(self) -> None:
        """Start every worker now, from the event loop's thread.

        The first mail does not wait for a process to start, and the workers'
        parent-death signal is tied to the thread that starts them (Linux
        follows the thread, not the process): the loop's thread lives as long
        as the server, where a helper thread from ``to_thread`` might not.
        """
        if self.workers <= 0 or self._slots:
            return
        self._stopping = False
        try:
            for _ in range(self.workers):
                self._slots.append(await self._spawn())
            await asyncio.gather(*(w.ready for w in self._slots if w.ready is not None))
        except BaseException:
            await self.stop()  # the ones already started do not outlive a failed start
            raise
        self._watchdog = asyncio.create_task(self._watch(), name="parser-watchdog")

    async def start(self) -> None:
        await self.warm_up()

    def preload(self, *modules: str) -> None:
        """Modules a process imports while starting, before its first call."""
        self._modules.update(modules)

    async def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            process = _start_process(theirs, self.memory_mb)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_connection(sock=ours, limit=2**16)
        except BaseException:
            ours.close()
            process.kill()
            process.join(5)  # reaped, not left a zombie (SIGKILL: at once)
            raise
        worker = _Worker(process, writer)
        worker.reader_task = asyncio.create_task(self._read(worker, reader), name="parser-read")
        ready = self._call(_ready, (tuple(sorted(self._modules)),), internal=True)
        worker.ready = ready.future
        self._write(worker, ready)
        return worker

    async def stop(self) -> None:
        """Hang up on every worker, wait for them briefly, kill the ones still busy."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._spare_task is not None:
            self._spare_task.cancel()
            with contextlib.suppress(BaseException):
                await self._spare_task  # a spare half started is killed by its start
            self._spare_task = None
        slots, self._slots = self._slots, []
        for worker in slots:
            busy = bool(worker.line)
            _hang_up(worker)
            _cancel(worker.line)
            _cancel(worker.queue)
            if busy:
                # Its calls are cancelled: a process in the middle of one would not
                # see the hang-up before it finished, and stopping would wait for it
                # (a stranger's slow parse held a shutdown 12 s, past its limit).
                with contextlib.suppress(Exception):
                    worker.process.kill()
        _cancel(self._backlog)
        _cancel(self._retries)
        await asyncio.to_thread(_join_all, [worker.process for worker in slots])

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.workers <= 0:
            return await asyncio.to_thread(fn, *args)
        if not self._slots:
            raise RuntimeError("the parser pool is not started")
        if self._unavailable and not self._alive():
            raise ParserUnavailable("no parse process could be started")
        self._modules.add(fn.__module__)
        # And the classes passed along (a provider's adapter class, unpickled by the
        # process): importing one on a fresh process's first call counted against that
        # call's limit, and on a loaded machine a good mail after a crash was killed
        # twice for it and dead-lettered (CI, 2026-12-01).
        self._modules.update(a.__module__ for a in args if isinstance(a, type))
        call = self._call(fn, args)
        self._send(call)
        return cast("T", await call.future)

    def _call(
        self, fn: Callable[..., Any], args: tuple[object, ...], *, internal: bool = False
    ) -> _Call:
        self._seq += 1
        future = asyncio.get_running_loop().create_future()
        return _Call(self._seq, fn, args, future, internal=internal)

    def _alive(self) -> list[_Worker]:
        return [w for w in self._slots if not w.dead]

    def _send(self, call: _Call) -> None:
        alive = self._alive()
        if not alive:
            self._backlog.append(call)  # sent once a replacement is up
            return
        now = asyncio.get_running_loop().time()
        self._write(
            min(alive, key=lambda w: (self._stuck(w, now), len(w.line) + len(w.queue))), call
        )

    def _stuck(self, worker: _Worker, now: float) -> bool:
        """On one call (not its own start) for longer than ``spare_after_s``."""
        return (
            bool(worker.line)
            and not worker.line[0].internal
            and worker.timed_out is None  # being killed: its successor takes the line
            and now - worker.head_since > self.spare_after_s
        )

    @staticmethod
    def _write(worker: _Worker, call: _Call) -> None:
        if len(worker.line) >= _AHEAD:
            worker.queue.append(call)
            return
        payload = call.encoded()
        if payload is None:
            return  # answered with its pickling error; nothing was written
        if not worker.line:
            worker.head_since = asyncio.get_running_loop().time()
        worker.line.append(call)
        worker.writer.write(_HEADER.pack(len(payload)))
        worker.writer.write(payload)

    def _pump(self, worker: _Worker) -> None:
        """Write the next queued calls, dropping those nobody waits for any more."""
        while worker.queue and len(worker.line) < _AHEAD:
            call = worker.queue.popleft()
            if not call.future.done():
                self._write(worker, call)

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                body = await reader.readexactly(_HEADER.unpack(header)[0])
                seq, ok, value = pickle.loads(body)  # noqa: S301 - our own worker's reply
                if not worker.line or worker.line[0].seq != seq:
                    raise RuntimeError(f"reply {seq} does not answer the call at the head")
                call = worker.line.popleft()
                worker.head_since = loop.time()
                self._pump(worker)
                if call.future.done():
                    continue  # its sender gave up (cancelled)
                if ok:
                    call.future.set_result(value)
                elif isinstance(value, MemoryError) and self.memory_mb > 0:
                    call.future.set_exception(
                        OverMemory(f"the message needed more than the parser's {self.memory_mb} MB")
                    )
                else:
                    call.future.set_exception(_as_exception(value))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker died (or was killed by the watchdog)
        except Exception:  # whatever it is, this worker cannot be trusted
            log.exception("parser worker's reply unreadable: replacing the worker")
        if self._stopping:
            return
        if worker not in self._slots:
            # A replacement still starting: _start_fresh waits on its first answer and
            # counts this as a failed start (a pause, then another try).
            worker.dead = True
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_exception(WorkerCrashed("the parser worker died while starting"))
            return
        await self._replace(worker)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = loop.time()
            for worker in self._alive():
                # A process still starting (its own first call at the head) gets as
                # long as it needs on a loaded machine, within reason.
                starting = bool(worker.line) and worker.line[0].internal
                limit = max(self.timeout_s, 120.0) if starting else self.timeout_s
                if worker.line and now - worker.head_since > limit:
                    log.error(
                        "parser worker stuck on one message: killing it",
                        extra={"timeout_s": self.timeout_s, "pid": worker.process.pid},
                    )
                    worker.timed_out = worker.line[0]
                    worker.process.kill()  # its reader sees the hang-up and replaces it
            self._tend_spares(now)

    def _tend_spares(self, now: float) -> None:
        """Start a spare when a worker is stuck with calls waiting behind it; stop
        spares idle for ``spare_idle_s`` while no worker is stuck."""
        alive = self._alive()
        stuck = [w for w in alive if self._stuck(w, now)]
        blocked = [w for w in stuck if len(w.line) > 1 or w.queue]
        spares = [w for w in self._slots if w.spare]
        starting = self._spare_task is not None and not self._spare_task.done()
        if blocked and not starting and len(spares) < self.spares:
            self._spare_task = asyncio.create_task(self._add_spare(), name="parser-spare")
        for worker in alive:
            if worker.line or worker.queue:
                worker.busy_at = now
            elif worker.spare and not stuck and now - worker.busy_at > self.spare_idle_s:
                log.info("stopping an idle spare parser process", extra={"pid": worker.process.pid})
                self._slots.remove(worker)  # its reader's hang-up then replaces nothing
                _hang_up(worker)
                asyncio.get_running_loop().run_in_executor(None, _join_all, [worker.process])

    async def _add_spare(self) -> None:
        """A spare process for the calls waiting behind stuck workers: the unwritten
        ones move to it, those already in a stuck worker's socket are sent again."""
        log.warning(
            "a parse has run for over spare_after_s with mail waiting: starting a spare "
            "parser process",
            extra={"spare_after_s": self.spare_after_s},
        )
        try:
            fresh = await self._spawn()
            await self._until_ready(fresh)
        except Exception:  # out of processes, or it died starting: the stuck one goes on
            log.exception("cannot start a spare parser process")
            return
        if self._stopping:
            _hang_up(fresh)
            await asyncio.to_thread(_join_all, [fresh.process])
            return
        now = asyncio.get_running_loop().time()
        fresh.spare = True
        fresh.busy_at = now
        self._slots.append(fresh)
        for worker in self._alive():
            if worker is fresh or not self._stuck(worker, now):
                continue
            waiting = [c for c in (*list(worker.line)[1:], *worker.queue) if not c.future.done()]
            worker.queue.clear()
            for call in waiting:
                self._write(fresh, call)

    async def _replace(self, dead: _Worker) -> None:
        """Put a fresh worker in the dead one's slot and hand it the dead one's line.

        The calls stay in ``dead.line`` until handed on, so a :meth:`stop` meanwhile
        cancels them like any other."""
        dead.dead = True
        with contextlib.suppress(Exception):
            dead.writer.close()
        if dead.process.is_alive():
            dead.process.kill()  # an unreadable reply: it may still be running
        await asyncio.to_thread(dead.process.join, 5)
        retry = self._blame(dead)
        dead.line.extend(call for call in dead.queue if not call.future.done())
        dead.queue.clear()
        if retry is not None:
            # Its second try comes after every call that was waiting, and after those
            # arriving while the fresh process starts (the backlog, _take_waiting):
            # one poison message delays the others by one time limit, not two.
            self._retries.append(retry)
        fresh = await self._start_fresh(dead.line)
        if self.stopping or dead not in self._slots:  # stopped meanwhile: it goes too
            _hang_up(fresh)
            await asyncio.to_thread(_join_all, [fresh.process])
            return
        self._slots[self._slots.index(dead)] = fresh
        # A spare's successor is a spare too: stopped once idle, not kept for good.
        fresh.spare = dead.spare
        fresh.busy_at = asyncio.get_running_loop().time()
        self._unavailable = False
        for call in self._take_waiting(dead.line):
            self._send(call)
        if fresh.dead:  # it died between its first answer and taking the slot
            await self._replace(fresh)

    def _take_waiting(self, line: collections.deque[_Call]) -> list[_Call]:
        """The calls of a dead worker's line, then the backlog, that someone still
        awaits; both emptied."""
        waiting = [
            call for call in (*line, *self._backlog, *self._retries) if not call.future.done()
        ]
        line.clear()
        self._backlog.clear()
        self._retries.clear()
        return waiting

    def _blame(self, dead: _Worker) -> _Call | None:
        """Count the death against the call at the head of the dead worker's line:
        given up at its second, else taken out of the line to be tried again (it is
        returned; the caller puts it last)."""
        retry = None
        line = dead.line
        if dead.ready is not None and not dead.ready.done():
            dead.ready.set_exception(WorkerCrashed("the parser worker died while starting"))
            dead.ready.exception()  # retrieved: nobody may be waiting
        started = not line or not line[0].internal
        while line and line[0].internal:
            line.popleft()  # it died starting: no message is to blame
        # The head is the culprit, unless the worker died while starting (the next
        # call never ran: three failed starts once gave an innocent mail up), or the
        # watchdog killed it for another call that finished just before the kill.
        if started and line and (dead.timed_out is None or dead.timed_out is line[0]):
            culprit = line.popleft()
            culprit.crashes += 1
            if culprit.crashes < 2:
                retry = culprit
            elif not culprit.future.done():
                culprit.future.set_exception(
                    WorkerCrashed("the message crashed the parser (or outlasted its time) twice")
                )
        log.error(
            "parser worker %s; starting another",
            "killed after timeout_s" if dead.timed_out is not None else "died",
            extra={"exitcode": dead.process.exitcode, "waiting": len(line)},
        )
        return retry

    async def _start_fresh(self, line: collections.deque[_Call]) -> _Worker:
        """A new worker that has answered its first call, however many tries it takes;
        between tries the waiting calls go to the workers still alive, or are answered
        "retry later" when none is.

        A process that dies (or hangs) before its first answer is a failed start like
        one that cannot be created: a broken install (a module that no longer imports
        after an upgrade under a running server) once made the pool start a process
        after another without a pause, a core busy and the mail waiting for good."""
        pause = 0.5
        while True:
            try:
                fresh = await self._spawn()
            except Exception:  # out of processes or descriptors: retried
                log.exception("cannot start a parser worker; retrying", extra={"pause_s": pause})
            else:
                try:
                    await self._until_ready(fresh)
                    break
                except Exception as exc:  # noqa: BLE001 - any failed start is retried
                    log.error(  # its traceback, if any, is the child's, on stderr
                        "parser worker died before its first answer; retrying",
                        extra={"pause_s": pause, "error": str(exc)},
                    )
            # Meanwhile the waiting calls go to the workers still alive; with none,
            # they are answered "retry later" rather than kept waiting.
            waiting = self._take_waiting(line)
            if self._alive():
                for call in waiting:
                    self._send(call)
            else:
                self._unavailable = True
                for call in waiting:
                    call.future.set_exception(
                        ParserUnavailable("no parse process could be started")
                    )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)
        return fresh

    async def _until_ready(self, worker: _Worker) -> None:
        """Wait for a fresh worker's first answer; on failure it is gone for good."""
        assert worker.ready is not None  # noqa: S101 - _spawn sets it
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), max(self.timeout_s, 120.0))
        except BaseException:
            worker.dead = True
            _hang_up(worker)
            worker.process.kill()
            await asyncio.to_thread(worker.process.join, 5)
            if not worker.ready.done():
                worker.ready.cancel()
            raise


def _hang_up(worker: _Worker) -> None:
    """Stop reading from a worker and close our end: it sees EOF and exits."""
    worker.dead = True
    if worker.reader_task is not None:
        worker.reader_task.cancel()
    with contextlib.suppress(Exception):
        worker.writer.close()


def _cancel(calls: collections.deque[_Call]) -> None:
    for call in calls:
        if not call.future.done():
            call.future.cancel()
    calls.clear()


def _join_all(processes: list[_Process]) -> None:
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def _ready(modules: tuple[str, ...] = ()) -> bool:  # pragma: no cover - in the worker
    """Up, with ``modules`` imported. One that fails to import is left to the call
    that needs it, which reports it."""
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    return True
