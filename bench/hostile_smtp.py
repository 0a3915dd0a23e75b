"""Legitimate mail while hostile SMTP clients attack: latency with and without the attack.

Usage: .venv/bin/python bench/hostile_smtp.py [--messages N] [--flooders F]

Starts `switchboard run` on the embedded broker, then measures, twice in the
same run (first quiet, then under attack):
  mail     one legitimate sender on 127.0.0.1, one message per connection, one
           after the other: p50/p99 from connect to the 250 after DATA
  healthz  GET /healthz every 20 ms on the same process: p50/p99
The attack runs in its own process, so the measuring client keeps its CPU share:
  holder   127.0.0.2 opens idle sessions up to its per-client limit and keeps
           trying for more (each extra one gets 421)
  flooder  127.0.0.3, F connections, each pipelining 50,000 NOOPs at once and
           reconnecting as soon as the server hangs up
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx

from bench.smtp_ingest import _reply, send_data
from switchboard.broker import free_port, wait_for_port

HOLDER = "127.0.0.2"
FLOODER = "127.0.0.3"
NOOPS_PER_CONNECTION = 50_000


def message(i: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Customer {i} <customer{i}@example.org>"
    msg["To"] = "support@example.com"
    msg["Subject"] = f"Where is my order {i}?"
    msg["Message-ID"] = f"<hostile-bench-{i}-{time.time_ns()}@example.org>"
    msg.set_content("Hello, my order has not arrived yet. " * 50)  # about 2 KB
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def send_one(port: int, raw: bytes) -> tuple[float, bytes]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
    try:
        greeting = await _reply(reader)
        if not greeting.startswith(b"220"):  # refused: every slot taken
            return time.perf_counter() - started, greeting
        writer.write(b"EHLO legit.example.org\r\n")
        await _reply(reader)
        await send_data(reader, writer, raw)
        line = await _reply(reader)
        took = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return took, line
    finally:
        writer.close()


async def measure(port: int, http_port: int, n: int) -> tuple[list[float], list[float], int]:
    mail: list[float] = []
    health: list[float] = []
    done = asyncio.Event()

    async def sample_health() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            while not done.is_set():
                started = time.perf_counter()
                await client.get("/healthz", timeout=30)
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample_health())
    refused = 0
    for i in range(n):
        took, line = await send_one(port, message(i))
        if line.startswith(b"250"):
            mail.append(took)
        else:
            refused += 1
    done.set()
    await sampler
    return mail, health, refused


# --- the attack, in its own process -------------------------------------------------


async def _hold(port: int, stop: EventType, stats: dict[str, int]) -> None:
    held: list[asyncio.StreamWriter] = []
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(HOLDER, 0)
            )
            greeting = await reader.readline()
        except OSError:
            await asyncio.sleep(0.05)
            continue
        if greeting.startswith(b"220"):
            held.append(writer)
            stats["held"] = len(held)
        else:
            stats["holder_refused"] += 1
            writer.close()
            await asyncio.sleep(0.05)  # keep knocking, as a bot would
    for writer in held:
        writer.close()


async def _flood(port: int, stop: EventType, stats: dict[str, int]) -> None:
    payload = b"EHLO flood.example\r\n" + b"NOOP\r\n" * NOOPS_PER_CONNECTION
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(FLOODER, 0)
            )
            writer.write(payload)
            answered = 0
            last = b""
            while line := await reader.readline():
                answered += line.startswith(b"250 OK")
                last = line
            stats["flood_connections"] += 1
            stats["noops_answered"] += answered
            stats["flood_421"] += last.startswith(b"421")
            writer.close()
        except OSError:
            stats["flood_resets"] += 1
            await asyncio.sleep(0.01)


def attack(
    port: int, flooders: int, stop: EventType, ready: EventType, out: dict[str, int]
) -> None:
    stats = {
        "held": 0,
        "holder_refused": 0,
        "flood_connections": 0,
        "flood_421": 0,
        "flood_resets": 0,
        "noops_answered": 0,
    }

    async def main() -> None:
        tasks = [asyncio.create_task(_hold(port, stop, stats))]
        tasks += [asyncio.create_task(_flood(port, stop, stats)) for _ in range(flooders)]
        while not stats["held"] and not stop.is_set():
            await asyncio.sleep(0.05)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    out.update(stats)


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return f"{name} none"
    p50 = statistics.median(values) * 1000
    p99 = values[max(0, int(len(values) * 0.99) - 1)] * 1000
    return f"{name} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  (n={len(values)})"


@contextlib.contextmanager
def running_smtp(**settings: str) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """`switchboard run` on the embedded broker, accepting mail for example.com, with
    ``settings`` (environment variables) on top: (SMTP port, HTTP port, process).
    Its log goes to $BENCH_LOG when set."""
    port, http_port = free_port(), free_port()
    with (
        tempfile.TemporaryDirectory() as data,
        open(os.environ.get("BENCH_LOG", os.devnull), "wb") as log,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_SMTP_PORT=str(port),
            SWITCHBOARD_HTTP_PORT=str(http_port),
            SWITCHBOARD_DATA_DIR=data,
            SWITCHBOARD_SMTP_DOMAINS="example.com",
            SWITCHBOARD_LOG_LEVEL="ERROR",
            SWITCHBOARD_SMTP_HOSTNAME="bench",
            SWITCHBOARD_SMTP_VERIFY="false",  # no DNS here; bench-smtp-auth measures it
            **settings,
        )
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("switchboard")), "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            if not wait_for_port("127.0.0.1", port, 60):
                raise SystemExit("switchboard did not listen")
            yield port, http_port, server
        finally:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--flooders", type=int, default=4)
    args = parser.parse_args()
    with running_smtp() as (port, http_port, _):
        asyncio.run(measure(port, http_port, 30))  # warm up
        quiet_mail, quiet_health, quiet_refused = asyncio.run(
            measure(port, http_port, args.messages)
        )
        manager = multiprocessing.Manager()
        stats = manager.dict()
        stop, ready = multiprocessing.Event(), multiprocessing.Event()
        attacker = multiprocessing.Process(
            target=attack, args=(port, args.flooders, stop, ready, stats)
        )
        attacker.start()
        if not ready.wait(30):
            raise SystemExit("the attack did not start")
        time.sleep(1)  # let the floods get going
        hostile_mail, hostile_health, hostile_refused = asyncio.run(
            measure(port, http_port, args.messages)
        )
        stop.set()
        attacker.join(30)
        attack_stats = dict(stats)
    print(f"hostile smtp: {args.messages} legitimate messages per phase, {args.flooders} flooders")
    print(f"quiet    {summary('mail', quiet_mail)}   refused {quiet_refused}")
    print(f"quiet    {summary('healthz', quiet_health)}")
    print(f"attacked {summary('mail', hostile_mail)}   refused {hostile_refused}")
    print(f"attacked {summary('healthz', hostile_health)}")
    print(f"attack: {attack_stats}")
    ratio = statistics.median(hostile_mail) / statistics.median(quiet_mail)
    print(f"mail p50 attacked / quiet = {ratio:.2f}")


if __name__ == "__main__":
    main()
