"""UUIDv7 ids (RFC 9562): every inbound message, dead letter and recorded agent action.

Made here rather than by the ``uuid6`` package, whose ``uuid7()`` keeps one
process's ids increasing by moving the timestamp a millisecond ahead whenever two
ids fall in the same millisecond. Past 1,000 ids a second (an edge at saturation
makes 2,000) its ids' time runs ahead of the clock without bound: 200,000 ids made
in 0.5 s carried a time 200 s in the future (measured 2026-11-30). Ids of two
processes then no longer sort by creation time, which the event contract promises
(README, "Topics").

The layout, big end first:

- 48 bits: Unix time in milliseconds;
- 4 bits: the version, 7;
- 12 bits: the fraction of that millisecond, in 1/4096 (RFC 9562 section 6.2,
  method 3: leftmost random bits replaced by clock precision);
- 2 bits: the variant, ``10``;
- 62 bits: random (``os.urandom``, read ahead in 4 KiB: see :class:`Entropy`).

Within a process ids strictly increase: when the clock has not moved past the last
id's 60-bit time (or went back), the new id takes that time plus one, a 4096th of a
millisecond; it runs ahead of the clock only past 4 million ids a second. Across
processes they sort by their time to a quarter of a microsecond, ties at random.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_RANDOM_MASK = (1 << 62) - 1
_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)


class Clock:
    """The 60-bit time of each new id (milliseconds << 12 | fraction), never at or
    below the last one it gave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def stamp(self, now_ns: int) -> int:
        ms, rest = divmod(now_ns, 1_000_000)
        stamp = (ms << 12) | (rest * 4096 // 1_000_000)
        with self._lock:
            if stamp <= self._last:
                stamp = self._last + 1
            self._last = stamp
        return stamp

    def after_fork(self) -> None:
        """A forked child gets a lock of its own: one held by another thread of the
        parent at the fork would never be released in the child."""
        self._lock = threading.Lock()


class Entropy:
    """Random bits from ``os.urandom``, read 4 KiB at a time: one ``getrandom`` call
    for 512 ids instead of one each (it showed in an edge's profile, 2026-11-30). A
    forked child drops the bytes it inherited, so no two processes use the same."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def bits64(self) -> int:
        with self._lock:
            at = self._at
            if at + 8 > len(self._pool):
                self._pool = os.urandom(self.SIZE)
                at = 0
            self._at = at + 8
            return int.from_bytes(self._pool[at : at + 8])

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0


_clock = Clock()
_entropy = Entropy()
os.register_at_fork(after_in_child=_clock.after_fork)
os.register_at_fork(after_in_child=_entropy.after_fork)


def uuid7() -> uuid.UUID:
    """A new UUIDv7, later than every id this process made before it."""
    return from_stamp(_clock.stamp(time.time_ns()))


def uuid7_text() -> str:
    """``str(uuid7())`` without the ``UUID`` object: an event's id is text, and the
    object and its ``str()`` were 2 of the 4 µs (2026-12-02)."""
    hexed = f"{_value(_clock.stamp(time.time_ns())):032x}"
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def from_stamp(stamp: int) -> uuid.UUID:
    """A UUIDv7 with this 60-bit time and fresh random bits."""
    return uuid.UUID(int=_value(stamp))


def _value(stamp: int) -> int:
    return (
        ((stamp >> 12) << 80)
        | ((stamp & 0xFFF) << 64)
        | _VERSION_AND_VARIANT
        | (_entropy.bits64() & _RANDOM_MASK)
    )


def unix_ms(value: uuid.UUID) -> int:
    """The Unix time in milliseconds a UUIDv7 carries."""
    return value.int >> 80
