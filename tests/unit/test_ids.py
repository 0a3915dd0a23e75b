"""UUIDv7 ids: time-ordered, the time they carry is the clock's, even in a burst."""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.queues
import os
import signal
import time
import uuid

from switchboard import ids
from switchboard.ids import Clock, from_stamp, unix_ms, uuid7


def test_ids_are_version_7_with_the_rfc_variant_and_distinct() -> None:
    made = [uuid7() for _ in range(10_000)]
    assert {u.version for u in made} == {7}
    assert {u.variant for u in made} == {uuid.RFC_4122}
    assert len({u.int & ((1 << 62) - 1) for u in made}) == len(made)  # random bits differ


def test_a_burst_keeps_increasing_and_keeps_the_clocks_time() -> None:
    # 200,000 ids in well under a second: uuid6.uuid7() moved the time a millisecond
    # ahead for each id in the same millisecond, 200 s into the future by the end.
    before = time.time_ns() // 1_000_000
    made = [uuid7() for _ in range(200_000)]
    after = time.time_ns() // 1_000_000
    assert all(a < b for a, b in itertools.pairwise(made))
    assert before <= unix_ms(made[0])
    assert unix_ms(made[-1]) <= after + 1
    assert str(made[-1]) == str(uuid.UUID(str(made[-1])))  # a plain UUID, round trips


def test_the_clock_never_goes_back_and_moves_a_4096th_of_a_millisecond() -> None:
    clock = Clock()
    first = clock.stamp(1_700_000_000_123_456_789)
    assert first >> 12 == 1_700_000_000_123  # milliseconds
    assert first & 0xFFF == 456_789 * 4096 // 1_000_000  # the fraction
    assert clock.stamp(1_700_000_000_123_456_789) == first + 1  # the same instant
    assert clock.stamp(1_699_999_999_000_000_000) == first + 2  # the clock went back
    later = clock.stamp(1_700_000_000_124_000_000)
    assert later >> 12 == 1_700_000_000_124  # back on the clock once it passes


def test_the_stamp_is_where_rfc_9562_puts_it() -> None:
    made = from_stamp((0x0123456789AB << 12) | 0xCDE)
    assert made.hex[:12] == "0123456789ab"  # unix_ts_ms
    assert made.hex[12] == "7"  # ver
    assert made.hex[13:16] == "cde"  # rand_a: the sub-millisecond fraction
    assert int(made.hex[16], 16) >> 2 == 0b10  # var


def _child_random_bits(out: multiprocessing.queues.Queue[list[int]]) -> None:
    out.put([uuid7().int & ((1 << 62) - 1) for _ in range(1_000)])


def test_forked_processes_use_different_random_bits() -> None:
    # The parent's clock and its pool of random bytes are inherited by the children:
    # each must drop the pool, or both would give the same random bits in turn.
    uuid7()
    fork = multiprocessing.get_context("fork")
    out: multiprocessing.queues.Queue[list[int]] = fork.Queue()
    children = [fork.Process(target=_child_random_bits, args=(out,)) for _ in range(2)]
    for child in children:
        child.start()
    one, two = out.get(timeout=30), out.get(timeout=30)
    for child in children:
        child.join(30)
    assert not set(one) & set(two)


def test_a_child_forked_while_the_clock_was_locked_still_makes_ids() -> None:
    uuid7()
    with ids._clock._lock:  # another thread of the parent, mid-id, at the fork
        pid = os.fork()
        if pid == 0:  # the child: its first id must not wait for the parent's lock
            uuid7()
            os._exit(0)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung on the clock's lock")
    assert os.waitstatus_to_exitcode(done[1]) == 0
