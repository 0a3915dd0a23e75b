"""Where the CPU of one HTTP hook request goes, process by process, under load.

Usage: PYTHONPATH=. .venv/bin/python bench/cpu_split.py [--workers N] [--seconds S]
Needs `wrk` (apt-get install wrk).

Starts `switchboard ingest http --workers N` (its embedded broker beside it), drives
the Twilio hook and then the JSON hook with wrk at c=64, a new message per request
(as `bench/http_ingest.py --fresh`), and reads every process's and thread's CPU
time from /proc before and after. Prints CPU microseconds per request for: the
edge processes' main threads (the event loop: HTTP, adapters, normalize, the
producer's send), their other threads (kafka-python's network thread, the blob
threads), the broker, and wrk. py-spy (`bench/profile_edges.py`) says what a main
thread does; this says how the whole machine's CPU divides, which a profile of one
process cannot.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.http_ingest import Fresh, Request, fresh_script, switchboard, wrk
from bench.machine import describe

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, list[str]]:
    text = Path(path).read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> dict[int, str]:
    """``root`` and every process below it: pid to command name."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name, fields = _stat(f"/proc/{entry}/stat")
            except OSError:
                continue
            parents[int(entry)] = (int(fields[1]), name)
    found = {root: parents.get(root, (0, "?"))[1]}
    grew = True
    while grew:
        grew = False
        for pid, (parent, name) in parents.items():
            if parent in found and pid not in found:
                found[pid] = name
                grew = True
    return found


def cpu_by_role(processes: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user and system) per process name, main thread and the rest apart."""
    seconds: dict[str, float] = defaultdict(float)
    for pid, name in processes.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                _, fields = _stat(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                continue
            role = f"{name}, {'main thread' if int(tid) == pid else 'other threads'}"
            seconds[role] += (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def measure(name: str, url: str, script: str, processes: dict[int, str], seconds: int) -> None:
    result: list[tuple[float, float, float, int]] = []
    load = threading.Thread(target=lambda: result.append(wrk(url, script, seconds, 64)))
    before = cpu_by_role(processes)
    load.start()
    time.sleep(0.3)
    load_generator = {pid: "wrk" for pid, comm in descendants(os.getpid()).items() if comm == "wrk"}
    # wrk exits at the end of the run, and its CPU with it: read twice while it runs.
    wrk_started, wrk_before = time.perf_counter(), sum(cpu_by_role(load_generator).values())
    time.sleep(max(seconds - 1.0, 0.5))
    wrk_took = time.perf_counter() - wrk_started
    wrk_used = sum(cpu_by_role(load_generator).values()) - wrk_before
    load.join()
    used = {role: spent - before.get(role, 0.0) for role, spent in cpu_by_role(processes).items()}
    rate, _, p99, bad = result[0]
    requests = rate * seconds
    print(f"{name} c=64, new messages: {rate:,.0f} req/s, p99 {p99:.1f} ms, {bad} non-2xx")
    for role, spent in sorted(used.items(), key=lambda kv: -kv[1]):
        if spent > 0:
            print(f"  {role:38s} {spent / requests * 1e6:7.1f} us/request")
    total = sum(spent for spent in used.values() if spent > 0)
    print(f"  {'all server processes':38s} {total / requests * 1e6:7.1f} us/request")
    print(f"  {'wrk (load generator)':38s} {wrk_used / wrk_took / rate * 1e6:7.1f} us/request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    print(describe(), flush=True)
    run = f"split-{time.time_ns()}"

    def each_hook(name: str, request: Request, make: Fresh | None) -> None:
        if make is None:  # only Mailgun's, which this bench skips
            raise SystemExit(f"{name}: the bench cannot make new messages for it")
        # The edge's processes: everything below this bench (no wrk runs between hooks).
        processes = descendants(os.getpid())
        del processes[os.getpid()]
        url = request[0]
        script, lines = fresh_script(make, 60_000, f"{run}-{name}")
        wrk(url, script, 2, 64)  # warm-up: its CPU is not counted
        measure(name, url, script, processes, args.seconds)
        os.unlink(script)
        os.unlink(lines)

    switchboard(
        ["ingest", "http", "--workers", str(args.workers)], "", each_hook, skip_mailgun=True
    )


if __name__ == "__main__":
    main()
