"""Group commit of blob writes (ingest.groupcommit): messages that arrive while a
write is in flight share the next one, and nobody is answered before their own
blobs are on disk. On the real file store and real threads."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ingest.groupcommit import GroupCommit
from normalize.content import Blob
from switchboard.blobs import BIG_BLOB, FileBlobStore


class Gated(FileBlobStore):
    """The file store, recording each write's blobs; the first write waits for
    ``gate``, and write n (from 1) raises ``failures[n]`` before it stores anything."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[list[str]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.failures: dict[int, BaseException] = {}

    def put_many(self, blobs: Sequence[Blob]) -> None:
        self.writes.append([b.data.decode() for b in blobs])
        self.started.set()
        if len(self.writes) == 1:
            assert self.gate.wait(10)
        if (failure := self.failures.pop(len(self.writes), None)) is not None:
            raise failure
        super().put_many(blobs)

    async def holding(self, first: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``first``, whose write is held until ``gate`` is set."""
        task = asyncio.create_task(first)
        await asyncio.to_thread(self.started.wait, 10)
        return task

    async def two_behind_a_held_write(
        self, send: Callable[[str], Coroutine[Any, Any, None]], first: str, then: str
    ) -> None:
        """``first`` sent and its write held; "b" and "c" sent meanwhile (they share
        the next write); the hold released; ``then`` sent once all are answered."""
        held = await self.holding(send(first))
        queued = [asyncio.create_task(send(t)) for t in ("b", "c")]
        await asyncio.sleep(0.05)
        self.gate.set()
        await asyncio.gather(held, *queued)
        await send(then)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    threads = ThreadPoolExecutor(4)
    yield threads
    threads.shutdown()


def _blob(text: str) -> Blob:
    return Blob.of(text.encode(), "text/plain")


def test_messages_arriving_during_a_write_share_the_next_one(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    group = GroupCommit(store, pool, in_flight=1)
    stored_when_answered: dict[str, bool] = {}

    async def send(text: str) -> None:
        blob = _blob(text)
        await group.store((blob,))
        stored_when_answered[text] = store.exists(blob.ref.sha256)

    async def main() -> None:
        first = await store.holding(send("first"))
        others = [asyncio.create_task(send(f"m{i}")) for i in range(30)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in [first, *others])  # all wait on disk
        store.gate.set()
        await asyncio.gather(first, *others)

    asyncio.run(main())
    assert store.writes == [["first"], [f"m{i}" for i in range(30)]]
    assert len(stored_when_answered) == 31
    assert all(stored_when_answered.values())


def test_a_failed_write_fails_its_messages_and_the_next_write_works(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    store.failures[1] = OSError(errno.ENOSPC, "No space left on device")
    group = GroupCommit(store, pool, in_flight=1)
    outcomes: dict[str, str] = {}

    async def send(text: str) -> None:
        try:
            await group.store((_blob(text),))
            outcomes[text] = "stored"
        except OSError as exc:
            outcomes[text] = f"errno {exc.errno}"

    asyncio.run(store.two_behind_a_held_write(send, "a", then="d"))
    # The first write (a) failed: its sender is told, nobody else is.
    assert outcomes == {"a": "errno 28", "b": "stored", "c": "stored", "d": "stored"}
    assert not store.exists(_blob("a").ref.sha256)


def test_an_unexpected_error_tells_each_sender_apart_and_the_next_write_works(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """A bug in a write (not an OSError) reaches each of its senders as their own
    OSError (the hand-off answers retry-later), never one object shared by all."""
    store = Gated(tmp_path)
    store.failures[2] = ValueError("a bug in the write")
    group = GroupCommit(store, pool, in_flight=1)
    errors: dict[str, BaseException] = {}

    async def send(text: str) -> None:
        try:
            await group.store((_blob(text),))
        except OSError as exc:
            errors[text] = exc

    asyncio.run(store.two_behind_a_held_write(send, "first", then="after"))
    assert sorted(errors) == ["b", "c"]  # the second write held b and c
    assert errors["b"] is not errors["c"]
    assert all(isinstance(e.__cause__, ValueError) for e in errors.values())
    assert store.exists(_blob("after").ref.sha256)


def test_a_sender_that_gave_up_does_not_disturb_the_others(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    group = GroupCommit(store, pool, in_flight=1)

    async def main() -> None:
        first = await store.holding(group.store((_blob("first"),)))
        gone = asyncio.create_task(group.store((_blob("gone"),)))
        kept = asyncio.create_task(group.store((_blob("kept"),)))
        await asyncio.sleep(0.01)
        gone.cancel()
        store.gate.set()
        await asyncio.gather(first, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(main())
    assert store.writes == [["first"], ["kept"]]  # a cancelled sender's blob is not written


def test_a_write_takes_at_most_max_bytes_and_others_start_beside_it(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    group = GroupCommit(store, pool, in_flight=2, max_bytes=10)

    async def main() -> None:
        first = await store.holding(group.store((_blob("first"),)))
        rest = [asyncio.create_task(group.store((_blob(f"{i:04d}"),))) for i in range(5)]
        try:
            # The first write is held (a big attachment on a slow disk): the others
            # are stored beside it meanwhile, in writes of at most 10 bytes.
            await asyncio.wait_for(asyncio.gather(*rest), 5)
            assert not first.done()
        finally:
            store.gate.set()
        await first

    asyncio.run(main())
    assert sorted(b for write in store.writes[1:] for b in write) == [f"{i:04d}" for i in range(5)]
    assert all(sum(len(b) for b in write) <= 10 for write in store.writes[1:])


def test_a_big_message_is_written_beside_the_queue(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    group = GroupCommit(store, pool, in_flight=1)
    big = Blob.of(b"B" * BIG_BLOB, "application/pdf")

    async def main() -> None:
        first = await store.holding(group.store((_blob("first"),)))
        try:
            # The only write of the queue is held; the big message does not wait for it.
            await asyncio.wait_for(group.store((big,)), 5)
            assert not first.done()
        finally:
            store.gate.set()
        await first

    asyncio.run(main())
    assert store.get(big.ref.sha256) == big.data


def test_senders_waiting_when_the_blob_threads_stop_are_told_and_nothing_hangs(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    store = Gated(tmp_path)
    group = GroupCommit(store, pool, in_flight=1)
    outcomes: list[str] = []

    async def send(text: str) -> None:
        try:
            await group.store((_blob(text),))
            outcomes.append(f"{text} stored")
        except OSError as exc:
            outcomes.append(f"{text}: {exc}")

    async def main() -> None:
        first = await store.holding(send("first"))
        queued = asyncio.create_task(send("queued"))
        await asyncio.sleep(0.01)
        pool.shutdown(wait=False)  # the edge is stopping
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, queued), 5)
        await send("late")

    asyncio.run(main())
    assert outcomes[0] == "first stored"
    assert outcomes[1].startswith("queued: blob writes stopped")
    assert outcomes[2].startswith("late: blob writes stopped")
