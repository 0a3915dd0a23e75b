"""The parser pool with real worker processes."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from ingest.workers import ParserPool, WorkerCrashed

pytestmark = pytest.mark.integration


def _pid_and_double(value: int) -> tuple[int, int]:
    return os.getpid(), value * 2


def _crash(_: int) -> int:
    os._exit(3)


def _hang(_: int) -> int:
    time.sleep(3600)
    return 0


def _refuse(value: int) -> int:
    raise ValueError(f"refused {value}")


def _slow_pid(value: int) -> tuple[int, int]:
    time.sleep(0.2)
    return os.getpid(), value


def test_work_runs_in_another_process_and_survives_a_crash() -> None:
    async def scenario() -> None:
        pool = ParserPool(workers=1)
        await pool.warm_up()
        try:
            pid, doubled = await pool.run(_pid_and_double, 21)
            assert doubled == 42
            assert pid != os.getpid()
            with pytest.raises(WorkerCrashed):
                await pool.run(_crash, 1)
            # A fresh worker took its place: the next message is parsed normally.
            fresh, doubled = await pool.run(_pid_and_double, 5)
            assert doubled == 10
            assert fresh != pid
        finally:
            await pool.stop()

    asyncio.run(scenario())


def test_a_poison_message_costs_only_itself() -> None:
    """Messages queued behind the one that kills the worker were never started: they
    go to the fresh worker without a mark, and only the culprit is reported."""

    async def scenario() -> None:
        pool = ParserPool(workers=1)
        await pool.warm_up()
        try:
            before = [pool.run(_pid_and_double, i) for i in range(3)]
            poison = pool.run(_crash, 0)
            after = [pool.run(_pid_and_double, i) for i in range(3, 40)]
            results = await asyncio.gather(*before, poison, *after, return_exceptions=True)
            assert isinstance(results[3], WorkerCrashed)
            doubled = [r[1] for r in results if isinstance(r, tuple)]
            assert doubled == [2 * i for i in range(40)]  # every innocent call answered
        finally:
            await pool.stop()

    asyncio.run(scenario())


def test_a_message_that_outlasts_the_time_limit_is_given_up_and_the_worker_replaced() -> None:
    async def scenario() -> None:
        pool = ParserPool(workers=1, timeout_s=0.5)
        await pool.warm_up()
        try:
            first, _ = await pool.run(_pid_and_double, 1)
            started = time.monotonic()
            stuck = pool.run(_hang, 0)
            behind = pool.run(_pid_and_double, 7)
            result = await asyncio.gather(stuck, behind, return_exceptions=True)
            assert isinstance(result[0], WorkerCrashed)
            assert result[1][1] == 14  # type: ignore[index]
            # Twice the limit (one retry), plus the watchdog's tick and two starts.
            assert time.monotonic() - started < 20
            later, _ = await pool.run(_pid_and_double, 2)
            assert later != first
        finally:
            await pool.stop()

    asyncio.run(scenario())


def test_an_exception_comes_back_as_itself_and_the_worker_stays() -> None:
    async def scenario() -> None:
        pool = ParserPool(workers=1)
        await pool.warm_up()
        try:
            pid, _ = await pool.run(_pid_and_double, 1)
            with pytest.raises(ValueError, match="refused 4"):
                await pool.run(_refuse, 4)
            again, _ = await pool.run(_pid_and_double, 1)
            assert again == pid
        finally:
            await pool.stop()

    asyncio.run(scenario())


def test_calls_spread_over_the_workers_and_stop_ends_them() -> None:
    async def scenario() -> list[int]:
        pool = ParserPool(workers=2)
        await pool.warm_up()
        try:
            results = await asyncio.gather(*(pool.run(_slow_pid, i) for i in range(6)))
            assert [value for _, value in results] == list(range(6))
            pids = {pid for pid, _ in results}
            assert len(pids) == 2
            return sorted(pids)
        finally:
            await pool.stop()

    pids = asyncio.run(scenario())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_zero_workers_means_a_thread_in_this_process() -> None:
    async def scenario() -> int:
        pool = ParserPool(workers=0)
        await pool.warm_up()
        pid, _ = await pool.run(_pid_and_double, 1)
        await pool.stop()
        return pid

    assert asyncio.run(scenario()) == os.getpid()
