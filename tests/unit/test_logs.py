"""The log writer: a log pipe nobody reads never blocks the thread that logs.

On a real OS pipe (64 KiB of buffer) whose reader stops, then reads again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from switchboard.logs import JsonFormatter, LineWriter, RepeatedLibraryLines, flush_logs

TOTAL = 1000
FILLER = "x" * 1000  # 1,000 lines of 1 KB: far more than the pipe holds


@pytest.fixture
def stalled() -> Iterator[tuple[int, LineWriter, logging.Logger]]:
    """A logger writing through a LineWriter into a pipe that is not read (yet)."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    writer = LineWriter(stream, backlog=50, flush_s=0.2)
    writer.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.stalled.{id(writer)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(writer)
    try:
        yield read_fd, writer, logger
    finally:
        logger.removeHandler(writer)
        os.close(read_fd)  # the writer's next write fails (EPIPE), and is let go
        writer.close()
        with contextlib.suppress(OSError):
            stream.close()  # what it still buffers has nowhere to go


def _log_all(logger: logging.Logger) -> bool:
    """Log TOTAL lines from another thread; True if that thread got through them."""
    done = threading.Event()

    def run() -> None:
        for n in range(TOTAL):
            logger.info("line %d", n, extra={"filler": FILLER})
        done.set()

    threading.Thread(target=run, daemon=True).start()
    # A hang guard, not a timing claim: 1,000 lines take milliseconds.
    return done.wait(30)


def _read_lines(read_fd: int, until: int, within_s: float = 30) -> list[dict[str, object]]:
    """Read the pipe until the lines and the dropped lines they report make ``until``."""
    os.set_blocking(read_fd, False)
    buffer, entries = b"", []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            chunk = b""
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        entries += [json.loads(line) for line in complete]
        if _written(entries) + _told(entries) >= until:
            return entries
        if not chunk:
            time.sleep(0.01)
    raise AssertionError(f"{len(entries)} lines read, expected {until} with the dropped")


def _written(entries: list[dict[str, object]]) -> int:
    return sum("filler" in e for e in entries)


def _told(entries: list[dict[str, object]]) -> int:
    return sum(int(str(e["log_lines_dropped"])) for e in entries if "log_lines_dropped" in e)


def test_a_stalled_reader_costs_lines_not_the_logging_thread(
    stalled: tuple[int, LineWriter, logging.Logger],
) -> None:
    read_fd, _writer, logger = stalled
    # Before the writer thread, this thread blocked on the full pipe after about 60
    # lines, for as long as nobody read.
    assert _log_all(logger), "logging blocked on a pipe nobody reads"

    entries = _read_lines(read_fd, TOTAL)
    written = [e for e in entries if "filler" in e]
    notices = [e for e in entries if "log_lines_dropped" in e]
    assert notices, "the drop was told once the pipe took lines again"
    assert all(e["level"] == "warning" for e in notices)
    assert len(written) + _told(entries) == TOTAL
    # The lines that got through are in order, and each is whole.
    numbers = [int(str(e["msg"]).split()[1]) for e in written]
    assert numbers == sorted(numbers)
    assert all(e["filler"] == FILLER for e in written)


def test_flush_writes_what_was_queued(stalled: tuple[int, LineWriter, logging.Logger]) -> None:
    read_fd, writer, logger = stalled
    for n in range(20):
        logger.info("queued %d", n)
    flush_logs(5)  # 20 short lines fit in the pipe: all written when it returns
    assert writer.wait(5)
    os.set_blocking(read_fd, False)
    lines = os.read(read_fd, 65536).decode().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == [f"queued {n}" for n in range(20)]


def test_a_wait_on_a_stalled_pipe_gives_up_after_its_time(
    stalled: tuple[int, LineWriter, logging.Logger],
) -> None:
    _read_fd, writer, logger = stalled
    assert _log_all(logger)
    # The pipe is full and nobody reads: the wait (and so an exit's flush) ends
    # without the lines instead of hanging.
    assert writer.wait(0.3) is False


def test_lines_after_close_and_in_a_forked_child_are_written_by_their_thread(
    stalled: tuple[int, LineWriter, logging.Logger],
) -> None:
    read_fd, writer, logger = stalled
    pid = os.fork()
    if pid == 0:  # the child has no writer thread, and leaves without logging's shutdown
        for n in range(5):
            logger.info("child %d", n)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    writer.close()
    logger.info("after close")
    os.set_blocking(read_fd, False)
    lines = os.read(read_fd, 65536).decode().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == [
        *(f"child {n}" for n in range(5)),
        "after close",
    ]


#: An edge's loop logging a line per message while failed fire-and-forget tasks are
#: freed by the cyclic garbage collector, whose "Task exception was never retrieved"
#: is logged from inside whatever the loop was doing: with queue.Queue's lock in the
#: handler, a log call inside a log call's put() hung the process within a second.
REENTRANT = """
import asyncio, logging, sys
from switchboard.logs import configure_logging
configure_logging("INFO", "json")
# Room and time for every line: the count below says none was lost to reentrancy,
# not to a backlog the pipe's reader (this test, on a loaded machine) let fill, nor
# to the exit's bounded flush (CI 2026-12-02: 34,158 of 40,000 written; both are
# by design, and the stderr kept was too short to say which).
handler = logging.getLogger().handlers[0]
handler.backlog = 1_000_000
handler.flush_s = 100
log = logging.getLogger("ingest.sdk")

async def fails():
    raise ConnectionResetError("peer went away")

async def main():
    for n in range(40000):
        task = asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0)
        box = [task]
        box.append(box)  # held only by a cycle: freed by the collector, some time
        del task, box
        log.info("message accepted", extra={"n": n})
    print("finished", flush=True)

asyncio.run(main())
"""


def test_a_line_logged_inside_a_log_call_does_not_hang_the_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", REENTRANT],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard: the run takes a few seconds
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "finished"
    assert done.stderr.count('"message accepted"') == 40000
    assert "exception was never retrieved" in done.stderr  # the collector did log


def test_a_line_the_writer_thread_logs_itself_neither_blocks_a_flush_nor_is_lost() -> None:
    """A `__del__` the collector runs on the writer thread may log there, while
    logging's shutdown holds the handler's lock and waits for that thread's flush."""
    logger = logging.getLogger("test.writer-thread")
    logger.propagate = False
    logger.setLevel(logging.INFO)

    class Stream(io.StringIO):
        logged = False

        def write(self, text: str) -> int:
            if not Stream.logged:
                Stream.logged = True
                logger.error("logged on the writer thread")
            return super().write(text)

    stream = Stream()
    writer = LineWriter(stream, flush_s=5)
    writer.setFormatter(JsonFormatter())
    logger.addHandler(writer)
    try:
        logger.info("first")
        writer.acquire()  # as logging.shutdown does around its flush
        try:
            assert writer.wait(5), "the flush waited for a writer waiting for the lock"
        finally:
            writer.release()
        writer.close()
        writer._thread.join(5)  # the end asked: the thread writes what it holds, then ends
    finally:
        logger.removeHandler(writer)
    lines = [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]
    assert lines == ["first", "logged on the writer thread"]


def test_the_smtp_servers_session_lines_show_only_at_debug() -> None:
    """aiosmtpd logs about ten INFO lines a session: 4,527 lines for 450 mails at
    INFO (operator review, 2026-12-01)."""
    levels = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging; from switchboard.logs import configure_logging\n"
            "for level in ('INFO', 'DEBUG', 'ERROR'):\n"
            "    configure_logging(level, 'json')\n"
            "    print(logging.getLevelName(logging.getLogger('mail.log').level))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert levels == ["WARNING", "INFO", "ERROR"]


def test_a_librarys_repeated_lines_are_shown_once_a_window_with_the_count() -> None:
    """kafka-python logged 128 ERROR lines in a 25-second broker outage, one a failed
    connection attempt (operator review, 2026-12-01)."""
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Collect()
    handler.addFilter(RepeatedLibraryLines(window_s=0.3))
    kafka_log, ours = logging.getLogger("kafka.net.manager"), logging.getLogger("ingest.sdk")
    for logger in (kafka_log, ours):
        logger.addHandler(handler)
        logger.propagate = False
    try:
        for n in range(50):
            kafka_log.error("Connection failed: %s", n)
            ours.error("spooling: %s", n)  # ours are never left out
        time.sleep(0.35)
        kafka_log.error("Connection failed: %s", 50)
    finally:
        for logger in (kafka_log, ours):
            logger.removeHandler(handler)
            logger.propagate = True
    from_kafka = [r for r in seen if r.name == "kafka.net.manager"]
    assert [r.getMessage() for r in from_kafka] == [
        "Connection failed: 0",
        "Connection failed: 50",
    ]
    assert getattr(from_kafka[1], "repeated", None) == 49
    assert len([r for r in seen if r.name == "ingest.sdk"]) == 50
