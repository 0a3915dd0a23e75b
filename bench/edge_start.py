"""How fast an edge's workers start, and how much memory each holds once started.

Usage: PYTHONPATH=. .venv/bin/python bench/edge_start.py [--role http|smtp]
                                    [--workers 2] [--runs 3]

Starts `switchboard ingest <role> --workers N` (``python -m switchboard.cli``, so
``PYTHONPATH`` picks the code measured) on an embedded broker of its own, with the
HTTP bench's hooks, and measures the time from the start to the first ``/readyz``
answered 200, then, 3 s later (every worker up), each process's resident memory
(``VmRSS``): the supervisor, its workers and the broker. Each worker is a fresh
interpreter (the supervisor executes ``switchboard.cli`` for it), so what a worker
imports is paid by each of them, in time and memory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.hostile_http import rss_mb
from bench.http_ingest import HOOK_CONFIG, edge_env
from switchboard.broker import free_port


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()


def one_run(role: str, workers: int) -> tuple[float, float, list[float], float]:
    """(seconds to the first /readyz 200, supervisor MB, each worker's MB, broker MB)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        config = Path(data) / "switchboard.toml"
        config.write_text(HOOK_CONFIG)
        env = edge_env(port, data, config)
        if role == "smtp":
            env["SWITCHBOARD_SMTP_ENABLED"] = "true"
            env["SWITCHBOARD_SMTP_PORT"] = str(free_port())
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "ingest", role, "--workers", str(workers)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            ready = None
            while ready is None and time.perf_counter() - started < 120:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        ready = time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            if ready is None:
                raise SystemExit("the edge did not answer /readyz 200 within 120 s")
            time.sleep(3)
            worker_mb, broker_mb = [], 0.0
            for pid in descendants(server.pid):
                line = command_line(pid)
                if "tansu" in line:
                    broker_mb += rss_mb(pid)
                elif "switchboard.cli" in line and "--workers" not in line:
                    worker_mb.append(rss_mb(pid))
            return ready, rss_mb(server.pid), sorted(worker_mb), broker_mb
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=("http", "smtp"), default="http")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    readies: list[float] = []
    workers_mb: list[float] = []
    for run in range(1, args.runs + 1):
        ready, supervisor, workers, broker = one_run(args.role, args.workers)
        readies.append(ready)
        workers_mb.extend(workers)
        print(
            f"run {run}: ready after {ready:.2f} s; RSS supervisor {supervisor:.0f} MB, "
            f"workers {', '.join(f'{mb:.0f}' for mb in workers)} MB, broker {broker:.0f} MB",
            flush=True,
        )
    if not workers_mb:
        raise SystemExit("no worker process found")
    print(
        f"ingest {args.role} --workers {args.workers}: ready after "
        f"{statistics.median(readies):.2f} s (median of {args.runs}), "
        f"worker RSS median {statistics.median(workers_mb):.0f} MB"
    )


if __name__ == "__main__":
    main()
