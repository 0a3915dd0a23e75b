"""How long the embedded broker takes to acknowledge, alone and beside busy processes.

Usage: PYTHONPATH=. .venv/bin/python bench/broker_latency.py [--runs 3] [--seconds 25]
                 [--rate 3000] [--size 1500] [--hogs 0] [--producer-session same|own]

Starts the embedded broker (Tansu, as ``switchboard run`` does), then for each run a
producer in a child process: a kafka-python producer built as an edge process builds
its own (``switchboard.kafka.new_producer`` with ``producer_settings``: ``acks=all``,
idempotent, the edge linger, the batch size and timeouts of ``KafkaSettings``'
defaults), on a topic of 3 partitions, without the Publisher around it; one record is sent
and acknowledged first (connection, metadata, producer id), then ``--rate`` records a
second of ``--size`` bytes for ``--seconds``, each timed from its scheduled send to its
acknowledgement (a late send counts as waiting). ``--hogs N`` runs N CPU-bound
processes beside it for the run, in this script's session (each stops by itself
after the run's time, should this script be killed); ``--producer-session own`` starts
the producer in a session of its own (``setsid``), so that Linux's autogroup
scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) puts it in another group
than the hogs, as a service manager's cgroups would; ``same`` keeps it with them, as
processes started from one terminal are (``make run``, the benches' edges and wrk).

Prints per run the acknowledgement's p50, p99, p99.9 and maximum, and the seconds
of the run in which a record waited over 100 ms. What it tells apart: stalls in
the edges' p99 (``bench/stalls.py``: the producer's network thread waiting) that
come from the broker and the producer sharing the cores, with no edge involved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from switchboard.bootstrap import producer_settings
from switchboard.broker import EmbeddedBroker
from switchboard.config import KafkaSettings
from switchboard.kafka import new_producer
from switchboard.topics import ensure_topics

TOPIC = "bench.broker-latency"
INNER = "--inner"
#: A busy process that ends by itself at the deadline it is given.
HOG = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass"
)
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def produce(bootstrap: str, rate: int, seconds: float, size: int) -> dict[str, object]:
    """The child's work: paced sends, each acknowledgement's latency."""
    # Built as an edge process builds its producer (the edge linger among them).
    settings = producer_settings(KafkaSettings(bootstrap=bootstrap), frozenset({"http"}))
    producer = new_producer(settings, "bench-broker-latency")
    producer.send(TOPIC, key=b"warm-up", value=b"x").get(timeout=30)
    failed = 0
    latencies: list[tuple[float, float]] = []
    lock = threading.Lock()
    value = b"x" * size
    started = time.perf_counter()
    sent = 0
    while (due := started + sent / rate) - started < seconds:
        if (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        future = producer.send(TOPIC, key=str(sent).encode(), value=value)

        def done(_metadata: object, at: float = due) -> None:
            with lock:
                latencies.append((at - started, time.perf_counter() - at))

        def lost(_error: object) -> None:
            nonlocal failed
            with lock:
                failed += 1

        future.add_callback(done)
        future.add_errback(lost)
        sent += 1
    producer.flush()
    producer.close()
    ordered = sorted(latency for _, latency in latencies)

    def quantile(q: float) -> float:
        return ordered[int(q * (len(ordered) - 1))] * 1000

    if not ordered:
        return {"sent": sent, "acknowledged": 0, "failed": failed}
    return {
        "sent": sent,
        "acknowledged": len(ordered),
        "failed": failed,
        "p50": quantile(0.5),
        "p99": quantile(0.99),
        "p999": quantile(0.999),
        "max": ordered[-1] * 1000,
        "slow_seconds": sorted({int(at) for at, latency in latencies if latency > 0.1}),
    }


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == INNER:
        bootstrap, rate, seconds, size = sys.argv[2:]
        print(json.dumps(produce(bootstrap, int(rate), float(seconds), int(size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--rate", type=int, default=3000)
    parser.add_argument("--size", type=int, default=1500)
    parser.add_argument("--hogs", type=int, default=0)
    parser.add_argument("--producer-session", choices=("same", "own"), default="same")
    args = parser.parse_args()
    autogroup = AUTOGROUP.read_text().strip() if AUTOGROUP.exists() else "absent"
    with EmbeddedBroker() as broker:
        ensure_topics(KafkaSettings(bootstrap=broker.bootstrap, partitions=3), (TOPIC,))
        print(
            f"{args.rate} records/s of {args.size} bytes for {args.seconds:.0f} s, "
            f"{args.hogs} busy processes beside, producer in the "
            f"{'same session as them' if args.producer_session == 'same' else 'its own session'}"
            f" (autogroup scheduling: {autogroup})"
        )
        for run in range(1, args.runs + 1):
            lifetime = str(args.seconds + 120)
            hogs = [
                subprocess.Popen([sys.executable, "-c", HOG, lifetime]) for _ in range(args.hogs)
            ]
            try:
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        INNER,
                        broker.bootstrap,
                        str(args.rate),
                        str(args.seconds),
                        str(args.size),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                    start_new_session=args.producer_session == "own",
                )
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            if child.returncode != 0:
                print(f"run {run}: the producer failed (exit {child.returncode}):")
                print(child.stderr[-4000:])
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            if not result["acknowledged"]:
                print(f"run {run}: nothing of {result['sent']:,} acknowledged")
                continue
            print(
                f"run {run}: {result['acknowledged']:,} of {result['sent']:,} acknowledged, "
                f"p50 {result['p50']:.1f} p99 {result['p99']:.1f} p99.9 {result['p999']:.1f} "
                f"max {result['max']:.1f} ms; seconds with a wait over 100 ms: "
                f"{result['slow_seconds'] or 'none'}; failed {result['failed']}"
            )
            if run < args.runs:
                time.sleep(3)  # the broker's and the producer's last batches settle


if __name__ == "__main__":
    main()
