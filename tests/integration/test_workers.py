"""The parser pool with real worker processes."""

from __future__ import annotations

import asyncio
import os

import pytest

from ingest.workers import ParserPool, WorkerCrashed

pytestmark = pytest.mark.integration


def _pid_and_double(value: int) -> tuple[int, int]:
    return os.getpid(), value * 2


def _crash(_: int) -> int:
    os._exit(3)


def test_work_runs_in_another_process_and_survives_a_crash() -> None:
    pool = ParserPool(workers=1)
    pool.start()

    async def scenario() -> None:
        pid, doubled = await pool.run(_pid_and_double, 21)
        assert doubled == 42
        assert pid != os.getpid()
        with pytest.raises(WorkerCrashed):
            await pool.run(_crash, 1)
        # The pool was rebuilt: the next message is parsed normally.
        _, doubled = await pool.run(_pid_and_double, 5)
        assert doubled == 10

    try:
        asyncio.run(scenario())
    finally:
        pool.stop()


def test_zero_workers_means_a_thread_in_this_process() -> None:
    pool = ParserPool(workers=0)
    pool.start()
    pid, _ = asyncio.run(pool.run(_pid_and_double, 1))
    pool.stop()
    assert pid == os.getpid()
