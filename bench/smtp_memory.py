"""How much memory the SMTP edge really holds for the message data its budget counts.

Usage: PYTHONPATH=. .venv/bin/python bench/smtp_memory.py [--budget-mib 64]
       [--size-mib 8] [--senders 12] [--messages 3]

Starts `switchboard run` (embedded broker) with ``[smtp] max_data_in_flight`` set to
--budget-mib, waits until it is idle, then has --senders connections each deliver
--messages messages of --size-mib (plain text, SIZE declared) at the same time. The
resident memory of the server process and of its children (the parse processes) is
sampled every 10 ms; the bench prints each one's peak above its idle figure beside
the budget, and how the messages were answered (250, or 452 when the budget was
full). Python keeps freed memory for reuse, so a peak is what the process keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections import Counter
from pathlib import Path

from bench.hostile_smtp import running_smtp
from bench.smtp_ingest import _reply

MIB = 1024 * 1024


def rss_of_tree(pid: int) -> tuple[int, int]:
    """Resident bytes of a process, and of its descendants together."""
    own = others = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                size = int(line.split()[1]) * 1024
                if current == pid:
                    own = size
                else:
                    others += size
        todo.extend(int(c) for c in children)
    return own, others


def message(size: int, n: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * (size // len(line))
    return (
        f"From: Big <big{n}@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: big {n}\r\nMessage-ID: <big-{n}-{time.time_ns()}@example.org>\r\n\r\n"
    ).encode() + body


async def sender(port: int, k: int, count: int, size: int, replies: Counter[str]) -> None:
    # Each sender from its own loopback address: the per-client limits stay out of it.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(f"127.0.1.{k + 1}", 0)
    )
    greeting = await _reply(reader)
    if not greeting.startswith(b"220"):
        replies[f"greeting {greeting[:3].decode()}"] += 1
        writer.close()
        return
    writer.write(b"EHLO bench.example.org\r\n")
    await _reply(reader)
    for n in range(count):
        raw = message(size, k * 1000 + n)
        writer.write(
            b"MAIL FROM:<big@example.org> SIZE=%d\r\nRCPT TO:<support@example.com>\r\nDATA\r\n"
            % len(raw)
        )
        await _reply(reader)
        await _reply(reader)
        go = await _reply(reader)
        if not go.startswith(b"354"):  # no room for it now: 452 at DATA
            replies[go[:3].decode()] += 1
            continue
        writer.write(raw + b"\r\n.\r\n")  # no line starts with a dot
        replies[(await _reply(reader))[:3].decode()] += 1
    writer.write(b"QUIT\r\n")
    with contextlib.suppress(ConnectionError):  # the server may hang up first
        await writer.drain()
    writer.close()


async def deliver(port: int, senders: int, count: int, size: int) -> Counter[str]:
    replies: Counter[str] = Counter()
    await asyncio.gather(*(sender(port, k, count, size, replies) for k in range(senders)))
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--size-mib", type=int, default=8)
    parser.add_argument("--senders", type=int, default=12)
    parser.add_argument("--messages", type=int, default=3)
    args = parser.parse_args()
    with running_smtp(SWITCHBOARD_SMTP_MAX_DATA_IN_FLIGHT=str(args.budget_mib * MIB)) as (
        port,
        _,
        server,
    ):
        asyncio.run(deliver(port, 1, 1, MIB))  # the parse processes started, warm
        time.sleep(3)
        idle = rss_of_tree(server.pid)
        peak = list(idle)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                now = rss_of_tree(server.pid)
                peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        replies = asyncio.run(deliver(port, args.senders, args.messages, args.size_mib * MIB))
        took = time.perf_counter() - started
        done.set()
        sampler.join()
    print(
        f"{args.senders} senders x {args.messages} messages of {args.size_mib} MiB, "
        f"budget {args.budget_mib} MiB: replies {dict(replies)} in {took:.1f} s"
    )
    budget = args.budget_mib * MIB
    for name, before, top in (
        ("switchboard run", idle[0], peak[0]),
        ("its children (parse processes)", idle[1], peak[1]),
    ):
        print(
            f"{name}: resident idle {before / MIB:.0f} MiB, peak {top / MIB:.0f} MiB, "
            f"above idle {(top - before) / MIB:.0f} MiB = "
            f"{(top - before) / budget:.1f} x the budget"
        )


if __name__ == "__main__":
    main()
