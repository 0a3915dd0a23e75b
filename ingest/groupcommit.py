"""Group commit of blob writes: the blobs of messages that arrive together are made
durable together (:meth:`switchboard.blobs.BlobStore.put_many`), and each sender is
answered only once its own blobs are on disk.

Every message an edge accepts has at least one blob (its raw bytes). Written one
by one, each costs its own two fsyncs (the file, then its directory entry) and a
hop to a blob thread and back; at a few hundred messages a second those fsyncs
queue in the disk's flushes. Here, while one write is in flight, the messages
that arrive wait together and go to the next write in one hop: the longer a
write takes, the more messages share the next one, as with the spool's appends
and a database's commits. A message arriving while nothing is in flight is
written at once: no timer, no added wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from normalize.content import Blob
from switchboard.blobs import BIG_BLOB, BlobStore
from switchboard.metrics import BLOB_GROUP_BLOBS

log = logging.getLogger(__name__)


@dataclass
class _Lane:
    """One event loop's waiting messages and writes in flight."""

    waiting: deque[tuple[Sequence[Blob], asyncio.Future[None]]] = field(default_factory=deque)
    in_flight: int = 0


class GroupCommit:
    """Blob writes shared by concurrent messages, at most ``in_flight`` at a time,
    each at most ``max_bytes``; a message with :data:`~switchboard.blobs.BIG_BLOB`
    bytes of blobs or more is written on its own, outside this queue."""

    def __init__(
        self,
        store: BlobStore,
        executor: Executor,
        *,
        in_flight: int = 2,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self._store = store
        self._executor = executor
        self._in_flight = in_flight
        self._max_bytes = max_bytes
        # An edge runs one event loop; a test or an embedding may run several.
        self._lanes: dict[asyncio.AbstractEventLoop, _Lane] = {}

    async def store(self, blobs: Sequence[Blob]) -> None:
        """Return once every blob is stored durably; raise OSError if it was not."""
        loop = asyncio.get_running_loop()
        if sum(b.ref.size for b in blobs) >= BIG_BLOB:
            # A big message is written on its own, beside the lanes: the small ones
            # never wait in line behind copying its megabytes.
            job = self._submit(loop, blobs)
            try:
                await job
            except OSError:
                raise
            except Exception as exc:  # a bug, not a disk: told as a failed write
                log.error("blob write failed unexpectedly", exc_info=exc)
                raise _failed_write(exc) from exc
            return
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = _Lane()
        done: asyncio.Future[None] = loop.create_future()
        lane.waiting.append((blobs, done))
        self._write_more(loop, lane)
        await done

    def _write_more(self, loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
        while lane.waiting and lane.in_flight < self._in_flight:
            self._write_next(loop, lane)

    def _write_next(self, loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
        taken: list[tuple[Sequence[Blob], asyncio.Future[None]]] = []
        size = 0
        while lane.waiting:
            blobs, done = lane.waiting[0]
            bytes_ = sum(b.ref.size for b in blobs)
            if taken and size + bytes_ > self._max_bytes:
                break
            lane.waiting.popleft()
            if done.cancelled():
                continue  # its sender is gone: nothing to answer
            taken.append((blobs, done))
            size += bytes_
        if not taken:
            return
        try:
            job = self._submit(loop, [b for group, _ in taken for b in group])
        except OSError as exc:  # the edge is stopping
            for _, done in taken:
                if not done.done():
                    done.set_exception(OSError(str(exc)))
            return
        lane.in_flight += 1
        job.add_done_callback(lambda finished: self._answer(loop, lane, taken, finished))

    def _submit(
        self, loop: asyncio.AbstractEventLoop, blobs: Sequence[Blob]
    ) -> asyncio.Future[None]:
        """One write on the blob threads; OSError when they are shut down."""
        try:
            job = loop.run_in_executor(self._executor, self._store.put_many, blobs)
        except RuntimeError as exc:
            raise OSError(f"blob writes stopped: {exc}") from exc
        BLOB_GROUP_BLOBS.observe(len(blobs))
        return job

    def _answer(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: _Lane,
        taken: list[tuple[Sequence[Blob], asyncio.Future[None]]],
        job: asyncio.Future[None],
    ) -> None:
        lane.in_flight -= 1
        error = OSError("blob write cancelled") if job.cancelled() else job.exception()
        if error is not None and not isinstance(error, OSError):
            # A bug, not a disk: logged once here with its traceback. Its senders are
            # told what every failed write tells them (not stored: retry later).
            log.error("blob write failed unexpectedly", exc_info=error)
        for _, done in taken:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                # One exception object per waiter: each is raised in its own task, and
                # one object shared by several would collect all their tracebacks.
                done.set_exception(_failed_write(error))
        self._write_more(loop, lane)
        if not lane.waiting and lane.in_flight == 0:
            self._lanes.pop(loop, None)


def _failed_write(error: BaseException) -> OSError:
    """What a sender of a failed write is told: an OSError of its own (the hand-off
    answers retry-later), ``error`` as its cause."""
    if isinstance(error, OSError):
        told = OSError(error.errno, error.strerror or str(error))
    else:
        told = OSError(f"blob write failed: {error!r}")
    told.__cause__ = error
    return told
