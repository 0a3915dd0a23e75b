"""Logging setup: JSON lines for operators, plain text for humans.

Log records carry identifiers (message id, dedupe key, mailbox name), never
message bodies or secrets; extra fields passed with ``extra={...}`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

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
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
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
    if not any(isinstance(f, NoEnvelopeAddresses) for f in smtp_log.filters):
        smtp_log.addFilter(NoEnvelopeAddresses())
