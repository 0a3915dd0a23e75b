"""Where an edge's latency spikes come from: its threads, sampled while it is saturated.

Usage: PYTHONPATH=. .venv/bin/python bench/stalls.py [--runs 4] [--seconds 8]
                                      [--concurrency 64] [--min-ms 80]
Needs `wrk` (apt-get install wrk).

Starts `switchboard ingest http --workers 1` (the edge alone, the bench's Twilio
token, its own embedded broker) inside a sampler, and drives it with new Twilio
messages (``bench/http_ingest.py --fresh``) for ``--runs`` runs. Every 2 ms the
sampler records where the main thread is and what each other thread is doing.
A stretch of at least ``--min-ms`` in which the main thread stays in one place is a
stall. On uvloop the main thread is idle in ``runners.py run``: it has nothing to
do because every request is waiting for something else. For each stall the report
lists the other threads' most frequent places during it. ``blob-io ... packs.py
_sync`` means a blob pack's fsync; ``producer-network-thread ... select`` means
waiting for the broker. The time is wall time, so sampling gaps count too.

Not a throughput figure: the sampler takes its share of the GIL. py-spy (not
installed here) would be the finer tool; this one needs nothing but the standard
library.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench.http_ingest import HOOK_CONFIG, edge_env, fresh_script, twilio_request, wait_http, wrk
from switchboard.broker import free_port
from switchboard.cli import main as switchboard_main

INNER = "--inner"


def _place(frame: object, depth: int) -> str:
    stack = traceback.extract_stack(frame, limit=depth)  # type: ignore[arg-type]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(stack))


def _sample(report: Path, min_s: float) -> None:
    """Runs in the edge: samples every thread until the process ends."""
    main = threading.main_thread().ident
    me = threading.get_ident()
    here: str | None = None
    since = time.perf_counter()
    others: collections.Counter[str] = collections.Counter()
    with report.open("a") as out:
        while True:
            time.sleep(0.002)
            now = time.perf_counter()
            frames = sys._current_frames()
            frame = frames.get(main or 0)
            if frame is None:
                continue
            place = _place(frame, 1)
            if place != here:
                if here is not None and now - since >= min_s:
                    out.write(f"STALL {(now - since) * 1000:.0f} ms, main thread at {here}\n")
                    for where, count in others.most_common(6):
                        out.write(f"    {count:5d} samples  {where}\n")
                    out.flush()
                here, since, others = place, now, collections.Counter()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, other in frames.items():
                if ident not in (main, me):
                    others[f"{names.get(ident, '?')}: {_place(other, 2)}"] += 1


def inner(report: str, min_ms: float, argv: list[str]) -> int:
    threading.Thread(
        target=_sample, args=(Path(report), min_ms / 1000), daemon=True, name="stall-sampler"
    ).start()
    sys.argv = ["switchboard", *argv]
    return switchboard_main()


def outer(args: argparse.Namespace) -> None:

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        config = Path(data) / "switchboard.toml"
        config.write_text(HOOK_CONFIG)
        report = Path(data) / "stalls.txt"
        env = edge_env(port, data, config)
        command = [sys.executable, __file__, INNER, str(report), str(args.min_ms)]
        edge = subprocess.Popen(
            [*command, "ingest", "http", "--workers", "1"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            wait_http(port)
            time.sleep(3)
            script, lines = fresh_script(
                lambda n: twilio_request(port, n), 60_000, str(time.time_ns())
            )
            url = f"http://127.0.0.1:{port}/webhooks/twilio/sms"
            for run in range(1, args.runs + 1):
                started = report.stat().st_size if report.exists() else 0
                rate, p50, p99, _ = wrk(url, script, args.seconds, args.concurrency)
                print(f"run {run}: {rate:,.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
                if report.exists():
                    with report.open() as text:
                        text.seek(started)
                        print(text.read(), end="")
            os.unlink(script)
            os.unlink(lines)
        finally:
            edge.terminate()
            edge.wait(15)


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == INNER:
        sys.exit(inner(sys.argv[2], float(sys.argv[3]), sys.argv[4:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--min-ms", type=float, default=80.0)
    outer(parser.parse_args())


if __name__ == "__main__":
    main()
