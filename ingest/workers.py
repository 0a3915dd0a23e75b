"""Normalization off the server's event loop and, optionally, off its process.

Parsing MIME is CPU work under the GIL. In-process (``workers=0``) it runs on a
thread; with ``workers >= 1`` it runs in worker processes, started with
``spawn`` (forking a process that runs Kafka client threads is unsafe). Process
isolation also contains a message that crashes the parser: the pool is
rebuilt, the message retried once on a fresh worker, and only then reported
as a crash so the adapter can keep the raw bytes and dead-letter it.

A worker belongs to the server that started it: it leaves the terminal's
process group (Ctrl-C is for the server, which then stops the pool itself) and
dies with the server (Linux's parent-death signal), so a SIGKILLed server does
not leave parsers behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from switchboard.broker import die_with_parent

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerCrashed(RuntimeError):
    """The input crashed a worker process twice."""


def _init_worker(parent: int) -> None:  # pragma: no cover - runs in the worker
    # Its own session: the terminal's SIGINT reaches only the server, which shuts
    # the pool down in order, instead of a KeyboardInterrupt traceback here.
    with contextlib.suppress(OSError):
        os.setsid()
    die_with_parent()
    if os.getppid() != parent:  # the server died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _ready() -> bool:  # pragma: no cover - runs in the worker
    return True


class ParserPool:
    def __init__(self, workers: int = 0) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def start(self) -> None:
        if self.workers > 0 and self._pool is None:
            self._pool = self._new_pool()

    async def warm_up(self) -> None:
        """Start every worker now, from the event loop's thread.

        The first mail does not wait for a process to start, and the workers'
        parent-death signal is tied to the thread that starts them (Linux
        follows the thread, not the process): the loop's thread lives as long
        as the server, where a helper thread from ``to_thread`` might not.
        """
        if self._pool is None:
            return
        loop = asyncio.get_running_loop()
        pool = self._pool
        await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(self.workers)))

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pool is None:
            return await asyncio.to_thread(fn, *args)
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, fn, *args)
            except BrokenProcessPool:
                log.error("parser worker died; restarting the pool", extra={"attempt": attempt})
                if self._pool is pool:
                    self._pool = self._new_pool()
                    if pool is not None:
                        pool.shutdown(wait=False, cancel_futures=True)
        raise WorkerCrashed("the message crashed the parser twice")
