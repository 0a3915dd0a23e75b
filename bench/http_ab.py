"""Two edge configurations side by side, measured in alternation.

Usage: PYTHONPATH=. .venv/bin/python bench/http_ab.py [--rounds 6] [--seconds 6]
           [--concurrency 64] [--workers 2] [--hook json|twilio|both]
           [--a "NAME=VALUE ..."] [--b "NAME=VALUE ..."]
           [--a-path DIR] [--b-path DIR] [--fresh 40000]

One run of ``bench/http_ingest.py`` on this machine varies by a third from the next
(2026-12-02: the JSON hook, two processes, the same code, 2,842 to 4,056 req/s), so a
difference between two of its runs says little. Here both configurations run at
once, each a ``switchboard ingest http --workers N`` with its own embedded broker and
data directory, and wrk loads one, then the other, round after round, the order
swapped each round (use an even ``--rounds``); the idle one costs only its memory
broker's growing log: a drift of the machine reaches both. ``--a``/``--b`` are environment
settings (``SWITCHBOARD_KAFKA_EDGE_LINGER_MS=1``); ``--a-path``/``--b-path`` put a
checkout first on the server's ``PYTHONPATH`` (``git worktree add /work/old <sha>``)
to compare code. Each round sends new messages (wrk's ``--fresh`` script). Prints
every run, then the median and range of each side and the ratio of the medians.

Run it once with the same setting on both sides first: on 2026-12-02 such A/A runs
(4 rounds, 64 connections) gave ratios from 0.83 to 1.19, so four rounds here do not
separate differences under about 20%; more rounds narrow it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.http_ingest import (
    HOOK_CONFIG,
    SWITCHBOARD,
    Request,
    edge_env,
    fresh_script,
    json_hook_request,
    twilio_request,
    wait_http,
    wrk,
)
from switchboard.broker import free_port


@contextmanager
def _edge(env_text: str, path: str | None, workers: int) -> Iterator[int]:
    """A ``switchboard ingest http`` with the bench's hooks; yields its port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        config = Path(data) / "switchboard.toml"
        config.write_text(HOOK_CONFIG)
        env = edge_env(port, data, config)
        for item in env_text.split():
            name, equals, value = item.partition("=")
            if not equals or not name:
                raise SystemExit(f"not NAME=VALUE: {item!r}")
            env[name] = value
        if path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
        command = [SWITCHBOARD, "ingest", "http", "--workers"]
        server = subprocess.Popen([*command, str(workers)], env=env, stderr=subprocess.DEVNULL)
        try:
            wait_http(port)
            time.sleep(3)  # every worker started, not only the first
            yield port
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


#: A hook's request on a port; with a string, the n-th new message of a run.
Hook = Callable[[int, str | None], Request]


def _run(port: int, make: Hook, args: argparse.Namespace, tag: str) -> float:
    script, lines = fresh_script(lambda n: make(port, n), args.fresh, f"{time.time_ns()}-{tag}")
    url = make(port, None)[0]
    try:
        rate, _p50, p99, bad = wrk(url, script, args.seconds, args.concurrency)
    finally:
        os.unlink(script)
        os.unlink(lines)
    if bad:
        print(f"  ({bad} non-2xx answers, counted in the rate: read the run again)")
    if rate * args.seconds > args.fresh:
        print(f"  (more than {args.fresh:,} requests: some repeated, raise --fresh)")
    print(f"  {tag:<10} {rate:>8,.0f} req/s   p99 {p99:6.1f} ms", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hook", choices=("json", "twilio", "both"), default="both")
    parser.add_argument("--fresh", type=int, default=40000)
    parser.add_argument("--a", default="", help="environment of side A: NAME=VALUE ...")
    parser.add_argument("--b", default="", help="environment of side B")
    parser.add_argument("--a-path", help="a checkout first on side A's PYTHONPATH")
    parser.add_argument("--b-path", help="a checkout first on side B's PYTHONPATH")
    args = parser.parse_args()
    hooks = {"json": json_hook_request, "twilio": twilio_request}
    chosen = list(hooks) if args.hook == "both" else [args.hook]
    print(f"A: {args.a or '-'} {args.a_path or ''}\nB: {args.b or '-'} {args.b_path or ''}")
    with ExitStack() as stack:
        ports = {
            "A": stack.enter_context(_edge(args.a, args.a_path, args.workers)),
            "B": stack.enter_context(_edge(args.b, args.b_path, args.workers)),
        }
        rates: dict[tuple[str, str], list[float]] = {}
        for port in ports.values():  # warm up: imports, first batches, caches
            for hook in chosen:
                wrk(hooks[hook](port)[0], hooks[hook](port), 2, args.concurrency)
        for number in range(args.rounds):
            order = ("A", "B") if number % 2 == 0 else ("B", "A")
            print(f"round {number + 1}")
            for hook in chosen:
                for side in order:
                    rate = _run(ports[side], hooks[hook], args, f"{side} {hook}")
                    rates.setdefault((side, hook), []).append(rate)
    for hook in chosen:
        a, b = rates[("A", hook)], rates[("B", hook)]
        print(
            f"{hook}: A median {statistics.median(a):,.0f} ({min(a):,.0f}-{max(a):,.0f}), "
            f"B median {statistics.median(b):,.0f} ({min(b):,.0f}-{max(b):,.0f}), "
            f"B/A {statistics.median(b) / statistics.median(a):.2f}"
        )


if __name__ == "__main__":
    main()
