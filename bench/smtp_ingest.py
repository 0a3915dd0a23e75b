"""SMTP ingest throughput: switchboard run vs a bare aiosmtpd handler (the ceiling).

Usage: .venv/bin/python bench/smtp_ingest.py [--messages N] [--connections M] [--workers 1,2]

Runs three servers, one after the other, each in its own process on loopback,
and drives each with the same asyncio SMTP client (M connections, one EHLO per
connection, then MAIL/RCPT/DATA per message):
  bare        aiosmtpd, handle_DATA returns 250 at once (the design's ceiling)
  parse       aiosmtpd + email.message_from_bytes(policy=default) per message
  switchboard `switchboard run` on the embedded broker: normalize, fsync blobs,
              publish with acks=all, then 250
With ``--workers 1,2`` the switchboard target is `switchboard ingest smtp --workers
N` instead (the edge alone, its embedded broker beside it), once per N.
Message mix: 70% 2 KB plain text, 20% text+HTML alternative, 10% with a 50 KB PDF.
Reports accepted messages per second and p50/p99 time from end of DATA to 250.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from bench.machine import describe
from switchboard.broker import free_port, wait_for_port

BARE = """
import asyncio, sys
from aiosmtpd.smtp import SMTP
class H:
    async def handle_DATA(self, server, session, envelope):
        {work}
        return "250 OK"
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(H(), hostname="bench", loop=loop,
        enable_SMTPUTF8=True, data_size_limit=26214400), "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""
PARSE = (
    "import email, email.policy; "
    "email.message_from_bytes(envelope.original_content, policy=email.policy.default)"
)


def corpus(n: int) -> list[bytes]:
    rng = random.Random(7)
    words = [
        "invoice",
        "order",
        "refund",
        "delivery",
        "broken",
        "account",
        "password",
        "thanks",
        "please",
        "help",
    ]
    out = []
    for i in range(n):
        msg = EmailMessage()
        msg["From"] = f"Customer {i % 500} <customer{i % 500}@example.org>"
        msg["To"] = "support@example.com"
        msg["Subject"] = f"Question {i}: {' '.join(rng.choices(words, k=4))}"
        msg["Message-ID"] = f"<bench-{i}-{rng.random()}@example.org>"
        body = " ".join(rng.choices(words, k=300))  # about 2 KB
        msg.set_content(body)
        kind = rng.random()
        if kind < 0.2:
            msg.add_alternative(f"<p>{body}</p>", subtype="html")
        elif kind < 0.3:
            msg.add_attachment(
                os.urandom(50_000), maintype="application", subtype="pdf", filename="scan.pdf"
            )
        out.append(msg.as_bytes().replace(b"\n", b"\r\n"))
    return out


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def send_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> None:
    """One transaction up to the final dot, pipelined as MTAs do, SIZE declared; the
    caller reads the reply to DATA."""
    writer.write(
        b"MAIL FROM:<customer@example.org> SIZE=%d\r\n" % len(raw)
        + b"RCPT TO:<support@example.com>\r\nDATA\r\n"
    )
    for _ in range(3):
        await _reply(reader)  # replies can span lines
    writer.write(raw.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")


async def client(port: int, messages: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench.example.org\r\n")
    await _reply(reader)
    accepted = 0
    for raw in messages:
        await send_data(reader, writer, raw)
        started = time.perf_counter()
        line = await _reply(reader)
        latencies.append(time.perf_counter() - started)
        accepted += line.startswith(b"250")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return accepted


async def drive(
    port: int, messages: list[bytes], connections: int
) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    shares = [messages[i::connections] for i in range(connections)]
    started = time.perf_counter()
    accepted = await asyncio.gather(*(client(port, share, latencies) for share in shares))
    return sum(accepted), time.perf_counter() - started, latencies


def wait_port(port: int) -> None:
    if not wait_for_port("127.0.0.1", port, 30):
        raise SystemExit(f"nothing listening on {port}")


def run(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    *,
    args: argparse.Namespace,
    messages: list[bytes],
) -> float:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        if "--workers" in argv:
            time.sleep(8)  # every worker started, not only the first
        asyncio.run(
            drive(port, messages[: max(50, len(messages) // 10)], args.connections)
        )  # warm up
        accepted, took, latencies = asyncio.run(drive(port, messages, args.connections))
    finally:
        process.terminate()
        process.wait(15)
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    rate = accepted / took
    print(
        f"{name:<12}{rate:>9,.0f} msg/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   "
        f"({accepted}/{len(messages)} accepted in {took:.1f}s)"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--workers", help="e.g. 1,2: measure `switchboard ingest smtp --workers N` for each N"
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    messages = corpus(args.messages)
    print(
        f"smtp ingest, {len(messages)} messages over {args.connections} connections "
        f"(mean {sum(map(len, messages)) // len(messages)} B)"
    )
    env = dict(os.environ)
    port = free_port()
    bare = run(
        "bare",
        [sys.executable, "-c", BARE.format(work="pass"), str(port)],
        env,
        port,
        args=args,
        messages=messages,
    )
    port = free_port()
    parse = run(
        "parse",
        [sys.executable, "-c", BARE.format(work=PARSE), str(port)],
        env,
        port,
        args=args,
        messages=messages,
    )
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env.update(
            SWITCHBOARD_SMTP_PORT=str(port),
            SWITCHBOARD_HTTP_PORT=str(free_port()),
            SWITCHBOARD_DATA_DIR=data,
            SWITCHBOARD_SMTP_DOMAINS="example.com",
            SWITCHBOARD_LOG_LEVEL="WARNING",
            SWITCHBOARD_SMTP_HOSTNAME="bench",
            # No DNS on the bench machine; `make bench-smtp-auth` measures verification.
            SWITCHBOARD_SMTP_VERIFY="false",
            # One load generator on one address: the per-client limit is for strangers.
            SWITCHBOARD_SMTP_MAX_SESSIONS_PER_CLIENT="1000",
        )
        env.pop("SWITCHBOARD_KAFKA_BOOTSTRAP", None)
        env["SWITCHBOARD_KAFKA_EMBEDDED"] = "true"  # `ingest smtp` alone, its own broker
        switchboard = str(Path(sys.executable).with_name("switchboard"))
        targets = (
            [("switchboard", [switchboard, "run"])]
            if not args.workers
            else [
                (f"ingest x{n}", [switchboard, "ingest", "smtp", "--workers", n])
                for n in args.workers.split(",")
            ]
        )
        rates = {}
        for name, argv in targets:
            port = free_port()
            env["SWITCHBOARD_SMTP_PORT"] = str(port)
            env["SWITCHBOARD_HTTP_PORT"] = str(free_port())
            rates[name] = run(name, argv, env, port, args=args, messages=messages)
    for name, rate in rates.items():
        print(f"{name} / bare = {rate / bare:.0%}", end="   ")
    print(f"parse / bare = {parse / bare:.0%}")


if __name__ == "__main__":
    main()
