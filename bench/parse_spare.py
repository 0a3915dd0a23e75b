"""How long small mail waits behind a long parse, with and without the spare process.

Usage: PYTHONPATH=. .venv/bin/python bench/parse_spare.py [--rounds 3] [--big-mb 24]

One parse pool of one process, as `switchboard ingest smtp` has per server process,
running the real parse (`normalize.email.serialize_email`, the SMTP edge's call): a
big mail (``--big-mb`` MB of HTML, one block of tiny tags: 6.7 s to parse at 24 MB on
2026-12-02 once its text was taken in linear time; 50-58 s at 4 MB before) is sent,
then, 0.1 s later, ten 2 KB mails, one every 0.1 s. Printed per round: the big
mail's parse time and the small mails' latencies (sent to answered), with the pool's
spare processes off (``spares=0``, the behaviour before 2026-12-02) and on (the
default: a spare once a parse has run ``spare_after_s``, 2 s, with mail waiting).
The rounds alternate the two settings. The spare's start (a fresh interpreter and
the parse modules) is part of what the small mails wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

from ingest.workers import ParserPool
from normalize.email import EmailContext, serialize_email
from switchboard.ids import uuid7


def _mail(n: int, body: bytes) -> bytes:
    return (
        f"From: Ann <ann{n}@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: Mail {n}\r\nMessage-ID: <bench-{n}-{time.time_ns()}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    ).encode() + body


def _ctx() -> EmailContext:
    return EmailContext(
        adapter="smtp",
        message_id=uuid7(),
        received_at=datetime.now(UTC),
        mail_from="ann@example.org",
        rcpt_tos=("support@example.com",),
    )


async def _round(spares: int, big_mb: int) -> tuple[float, list[float]]:
    pool = ParserPool(workers=1, timeout_s=60, spares=spares)
    pool.preload("normalize.email")
    await pool.warm_up()
    try:
        await pool.run(serialize_email, _mail(0, b"<p>warm</p>"), _ctx())
        big = _mail(1, b"<p>" + b"<b>x</b> word " * (big_mb * 1024 * 1024 // 14) + b"</p>")
        small_body = b"<p>" + b"Hello, my order has not arrived. " * 60 + b"</p>"

        async def timed(raw: bytes) -> float:
            started = time.perf_counter()
            await pool.run(serialize_email, raw, _ctx())
            return time.perf_counter() - started

        big_task = asyncio.ensure_future(timed(big))
        smalls = []
        for n in range(10):
            await asyncio.sleep(0.1)
            smalls.append(asyncio.ensure_future(timed(_mail(100 + n, small_body))))
        waits = list(await asyncio.gather(*smalls))
        return await big_task, waits
    finally:
        await pool.stop()


async def main(rounds: int, big_mb: int) -> None:
    for r in range(rounds):
        for spares in (0, 1) if r % 2 == 0 else (1, 0):
            big, waits = await _round(spares, big_mb)
            print(
                f"round {r + 1}, spares={spares}: big mail {big:.2f} s; small mails "
                f"median {statistics.median(waits) * 1000:.0f} ms, "
                f"max {max(waits) * 1000:.0f} ms",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=24)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.big_mb))
