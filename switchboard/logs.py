"""Logging setup: JSON lines for operators, plain text for humans.

Log records carry identifiers (message id, dedupe key, mailbox name), never
message bodies or secrets; extra fields passed with ``extra={...}`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any, TextIO

CONTENT_LOGGERS = ("mail.log", "imapclient")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """Human-readable lines that still show the structured fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} [{extras}]" if extras else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


#: Lines a process holds for its log writer thread before it drops new ones.
LOG_BACKLOG = 10_000


class LineWriter(logging.Handler):
    """The root handler: a record is formatted in the thread that logs it (the line
    then holds only a string) and written to ``stream`` by a thread of its own.

    Written by the logging thread, one stalled reader of the log pipe (a log shipper
    that stopped, a paused ``| less``) would block every thread that logs once the
    pipe's 64 KiB are full: an edge's event loop writes a line per accepted message,
    so the edge would stop answering. Here a stream that stops draining fills
    ``backlog`` lines, then new lines are dropped and counted (the metric
    ``switchboard_log_lines_dropped_total``, and a warning line with
    ``log_lines_dropped`` once the stream takes lines again) and the thread that
    logged goes on.

    ``emit`` takes no lock of its own: a line may be logged from inside another
    log call on the same thread (a ``__del__`` or an asyncio task's "exception was
    never retrieved" run by the garbage collector, a signal handler), and the C
    ``SimpleQueue.put`` is safe there where ``queue.Queue``'s lock deadlocked.
    ``flush`` waits at most ``flush_s`` for the lines queued so far (logging's
    shutdown at exit calls it; :func:`flush_logs` before a hard exit). Once closed,
    and in a forked child, lines are written by the thread that logs them."""

    def __init__(self, stream: TextIO, backlog: int = LOG_BACKLOG, flush_s: float = 5.0) -> None:
        super().__init__()
        self.stream = stream
        self.backlog = backlog
        self.flush_s = flush_s
        self.dropped = 0  # ever; only this process's emit adds, under _counting
        self._told = 0  # of those, reported by a notice and the metric (writer thread)
        self._pid = os.getpid()
        self._closed = False
        self._counting = threading.RLock()
        self._lines: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()
        _WRITERS.add(self)

    def _threaded(self) -> bool:
        return not self._closed and self._pid == os.getpid() and self._thread.is_alive()

    def handle(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() != self._thread.ident:
            return super().handle(record)
        # A line logged on the writer thread itself (a __del__ the collector runs
        # there): without the handler's lock, which logging's shutdown holds while
        # its flush waits for this thread.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging never raises into its caller
            self.handleError(record)
            return
        if not self._threaded():
            self._out(line + "\n")  # closed, or a forked child (exits without a flush)
        elif self._lines.qsize() >= self.backlog:
            with self._counting:  # reentrant: a line logged inside a log call
                self.dropped += 1  # told by the writer when it can write
        else:
            self._lines.put(line)

    def _write(self) -> None:
        # Everything queued goes out in one write: a busy event loop lets this thread
        # have the GIL once per switch interval (5 ms), and a line a turn would let
        # the backlog fill at a few hundred lines a second.
        while True:
            batch, flushes, end = self._take()
            if not end:
                self._tell_drops(batch)
            self._out("".join(batch))
            for flush in flushes:
                flush.set()  # every line queued before it is written
            if end:
                return

    def _take(self) -> tuple[list[str], list[threading.Event], bool]:
        """What is queued (waiting for the first): lines, flushes, and whether the end
        was asked (then with the lines the writer thread logged itself after it)."""
        lines = self._lines
        batch: list[str] = []
        flushes: list[threading.Event] = []
        end = False
        item = lines.get()
        while True:
            if item is None:
                end = True
            elif isinstance(item, threading.Event):
                flushes.append(item)
            else:
                batch.append(item + "\n")
            if len(batch) >= 1000 and not end:
                return batch, flushes, end
            try:
                item = lines.get_nowait()
            except queue.Empty:
                return batch, flushes, end

    def _tell_drops(self, batch: list[str]) -> None:
        dropped = self.dropped
        if dropped == self._told:
            return
        count, self._told = dropped - self._told, dropped
        try:
            batch.append(self._notice(count) + "\n")
            # Imported here, when lines are dropped: the metrics module brings kafka-python
            # and prometheus-client (0.17 s) into every CLI command that logs.
            from switchboard.metrics import LOG_LINES_DROPPED  # noqa: PLC0415

            LOG_LINES_DROPPED.inc(count)
        except Exception:  # noqa: BLE001 - the writer must outlive a notice that fails
            self.handleError(logging.makeLogRecord({"msg": "log lines dropped"}))

    def _out(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # the reader is gone (EPIPE) or the stream closed: nowhere to tell

    def _notice(self, dropped: int) -> str:
        record = logging.LogRecord(
            "switchboard.logs",
            logging.WARNING,
            __file__,
            0,
            "log lines dropped: the log output was not read fast enough",
            None,
            None,
        )
        record.log_lines_dropped = dropped
        self.filter(record)  # the worker's field, as on every line
        return self.format(record)

    def flush(self) -> None:
        """Wait, at most ``flush_s``, until the lines queued so far are written."""
        self.wait(self.flush_s)

    def wait(self, timeout_s: float) -> bool:
        """True once every line queued so far is written; False after ``timeout_s``."""
        if not self._threaded():
            return True
        if threading.get_ident() == self._thread.ident:
            return False  # the writer cannot wait for itself
        written = threading.Event()
        self._lines.put(written)
        return written.wait(timeout_s)

    def close(self) -> None:
        # logging's shutdown has flushed (at most flush_s): the thread is told to end,
        # and lines still queued behind a pipe that does not drain are lost with it.
        self.acquire()  # emit checks and queues under it: no line lands behind the end
        try:
            threaded = self._threaded()
            self._closed = True
            if threaded:
                self._lines.put(None)
        finally:
            self.release()
        if threaded:
            self._thread.join(0.1)
        _WRITERS.discard(self)
        super().close()


_WRITERS: weakref.WeakSet[LineWriter] = weakref.WeakSet()


def flush_logs(timeout_s: float = 0.5) -> None:
    """Write what the log writers hold, waiting at most ``timeout_s`` each: before an
    ``os._exit``, which skips logging's own shutdown, and before a line written to
    stderr directly (:func:`stderr_line`)."""
    for writer in list(_WRITERS):
        writer.wait(timeout_s)


def stderr_line(text: str) -> None:
    """``text`` as one line on stderr, after the log lines queued before it: a
    ``print`` to stderr writes its text and its newline apart, and a log line written
    in between would splice into it."""
    flush_logs()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class NoEnvelopeAddresses(logging.Filter):
    """aiosmtpd logs, at INFO, every command line a client sends (``MAIL
    FROM:<alice@example.org>``) and the sender and each recipient again: customers'
    addresses in every log line of a session. Command lines keep their verb only;
    the sender and recipient lines are dropped (the message's own log line has ids)."""

    DROPPED = frozenset({"%r sender: %s", "%r recip: %s"})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.DROPPED:
            return False
        if record.msg == "%r >> %r" and isinstance(record.args, tuple) and len(record.args) == 2:
            line = record.args[1]
            if isinstance(line, bytes | str):
                verb = line.split(maxsplit=1)[0] if line.split() else line
                record.args = (record.args[0], verb)
        return True


#: ``<index>/<count>``: set for a worker process by its supervisor
#: (switchboard.supervisor); its lines then carry ``worker``.
WORKER_ENV = "SWITCHBOARD_WORKER_OF"


class WorkerField(logging.Filter):
    """``worker=<i>`` on every line of a worker process (``--workers``), so the
    lines of a fleet's workers can be told apart."""

    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


class RepeatedLibraryLines(logging.Filter):
    """At most one line of a library's logger (kafka-python's) with the same message
    every ``window_s``; the next one says how many were left out (``repeated``).

    kafka-python logs each failed connection attempt at ERROR: 128 lines in a
    25-second broker outage, enough to page whoever alerts on error lines (operator
    review, 2026-12-01). Ours say what the outage means (spooling, retrying)."""

    def __init__(self, prefixes: tuple[str, ...] = ("kafka",), window_s: float = 30.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window_s = window_s
        self._lock = threading.Lock()
        #: (logger, message template) -> (when last shown, lines left out since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            shown, left_out = self._seen.get(key, (None, 0))
            if shown is not None and now - shown < self.window_s:
                self._seen[key] = (shown, left_out + 1)
                return False
            self._seen[key] = (now, 0)
        if left_out:
            record.repeated = left_out
        return True


#: The standard library's process-wide switches configure_logging turns off.
PROCESS_WIDE = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Switchboard's logging for this process: the root handler, the levels, and
    (process-wide, for every logger of the process, not only ours) no caller file,
    line, thread or process name on records (:data:`PROCESS_WIDE`)."""
    # Our lines carry neither the caller's file and line nor the thread or process
    # name, and the standard library works them out for every record: walking the
    # stack to the caller (findCaller) is a quarter of a line's cost. An edge logs
    # each accepted message at INFO, the default level; these took one JSON line
    # from 16.0 to 13.7 µs (an idle machine, timeit, 2026-11-30).
    logging._srcfile = None  # documented in logging/__init__.py: skips findCaller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineWriter(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RepeatedLibraryLines())
    worker = os.environ.get(WORKER_ENV)
    if worker:
        handler.addFilter(WorkerField(worker.split("/")[0]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; ours say what matters.
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(level), logging.ERROR))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs every request at INFO (media downloads, `switchboard send`'s own post).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Libraries that write message content at DEBUG: aiosmtpd every DATA line
    # ("mail.log"), imapclient every FETCH response. Whatever the level, they stay
    # at INFO or above, so that even a debug log never holds a customer's message.
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.INFO))
    smtp_log = logging.getLogger("mail.log")
    # aiosmtpd logs about ten INFO lines a session (connect, EHLO, MAIL, RCPT, DATA,
    # QUIT), the peer inside free text: 4,527 lines for 450 mails (operator review,
    # 2026-12-01). At INFO our own line a message says what happened; the session's
    # lines show at DEBUG (still at INFO themselves, as above).
    if logging.getLevelName(level) > logging.DEBUG:
        smtp_log.setLevel(max(logging.getLevelName(level), logging.WARNING))
    if not any(isinstance(f, NoEnvelopeAddresses) for f in smtp_log.filters):
        smtp_log.addFilter(NoEnvelopeAddresses())
