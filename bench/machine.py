"""What this machine is right now: the CPU model and whether its two cores run at once.

Usage: .venv/bin/python bench/machine.py   (the benches print the same line first)

This machine's speed for Switchboard moved by a factor of two between boots while a
one-thread ``timeit`` barely moved (2026-12-03: 12.0 ms on a boot where two edge
processes served 2,500-3,900 req/s, 11.2 ms on one where they served 5,900, with the
same code). What differed is whether two busy processes slow each other down: a
bench with two edges, the broker and wrk needs both cores, a bare hook only one. So
the line times the same loop alone and then twice at once, in two processes; "two at
once" near "alone" means two real cores, near twice as slow means they share one
(hyperthreads of one core, or a host short of CPU). Compare bench figures only
between runs whose lines agree.
"""

from __future__ import annotations

import multiprocessing
import platform
import time
from pathlib import Path

_LOOPS = 40


def _loop_ms(_: object = None) -> float:
    """The best of five timings of one pure-Python loop, in ms."""
    best = float("inf")
    for _round in range(5):
        started = time.perf_counter()
        for _i in range(_LOOPS):
            sum(range(10**6))
        best = min(best, (time.perf_counter() - started) / _LOOPS * 1000)
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """One line: the CPU model, the loop alone and two at once (ms, lower is faster)."""
    alone = _loop_ms()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        both = pool.map(_loop_ms, range(2))
    return (
        f"machine: {cpu_model()}, {multiprocessing.cpu_count()} CPUs; "
        f"sum(range(10**6)) {alone:.1f} ms alone, {max(both):.1f} ms two at once"
    )


if __name__ == "__main__":
    print(describe())
