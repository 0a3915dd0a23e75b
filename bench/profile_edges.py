"""Where an edge's CPU goes at saturation: py-spy on `switchboard ingest http|smtp`.

Usage: PYTHONPATH=. .venv/bin/python bench/profile_edges.py [--seconds S]
Needs `wrk` (apt-get install wrk) and py-spy (pip install py-spy; ptrace rights).

Starts the embedded broker alone (`switchboard broker`), then each edge role as its
own single process on it (`--workers 1`: py-spy samples one process; the router and
sinks of `switchboard run` are not in the profile), saturates it (wrk at c=64 for
Twilio and the JSON hook; 16 SMTP connections sending the bench corpus), and
samples it with py-spy for S seconds while the load runs (only samples holding the
GIL, every thread). Prints, per target, the share of samples per cost centre (each
sample goes to the centre of its innermost frame that belongs to one) and the
functions with the most samples of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.http_ingest import (
    HOOK_CONFIG,
    SECRET,
    TOKEN,
    Request,
    fresh_script,
    json_hook_request,
    twilio_request,
    wrk,
)
from bench.smtp_ingest import _reply, corpus, drive, send_data
from switchboard.broker import free_port, wait_for_port

#: Cost centres: (name, pattern on a frame's file path, or "function (file)" for the
#: first), innermost first wins. Paths may be relative (a worker's own sys.path).
CENTRES = [
    ("blob fsync", r"\bfsync\b|fdatasync|(^|/)switchboard/blobs\.py"),
    ("kafka-python producer", r"(^|/)kafka/(producer|record|protocol|net|client|conn|metrics)"),
    ("crc32c / compression", r"crc32c|(^|/)kafka/codec"),
    ("process pool plumbing (pickling, pipes)", r"concurrent/futures/process\.py|multiprocessing/"),
    (
        "publish hand-off (threads, futures)",
        r"concurrent/futures/thread\.py|concurrent/futures/_base",
    ),
    ("pydantic", r"pydantic"),
    ("JSON", r"(^|/)json/|orjson"),
    ("MIME parse (email)", r"(^|/)email/(?!_validator)"),
    ("normalize", r"(^|/)normalize/"),
    ("email address checks (email_validator)", r"email_validator"),
    ("signature check", r"request_validator|(^|/)hmac\.py|hashlib|(^|/)ingest/auth"),
    ("phone numbers", r"phonenumbers"),
    ("SMTP protocol (aiosmtpd)", r"aiosmtpd"),
    (
        "HTTP server (uvicorn, h11, starlette, fastapi)",
        r"uvicorn|(^|/)h11/|starlette|fastapi|anyio",
    ),
    ("logging and metrics", r"(^|/)logging/|prometheus_client|(^|/)switchboard/logs\.py"),
    ("ingest (adapters, limits, spool)", r"(^|/)ingest/"),
    ("switchboard core (events, kafka wrapper)", r"(^|/)switchboard/"),
    ("asyncio event loop", r"asyncio/|selectors\.py|uvloop"),
    ("threading", r"threading\.py|(^|/)queue\.py"),
]
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(:\d+)?\)$")


def summarize(raw: Path, title: str) -> None:
    centres: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[0].startswith("process "):  # --subprocesses labels the stacks
            frames = frames[1:] or ["(no Python frame)"]
        total += count
        leaf = frames[-1]
        match = FRAME.match(leaf)
        own[f"{match['func']} ({_short(match['file'])})" if match else leaf] += count
        for frame in reversed(frames):
            parsed = FRAME.match(frame)
            where = parsed["file"] if parsed else frame
            name = next(
                (
                    n
                    for n, pattern in CENTRES
                    if re.search(pattern, where) or (n == "blob fsync" and "fsync" in frame)
                ),
                None,
            )
            if name is not None:
                centres[name] += count
                break
        else:
            centres["other"] += count
    print(f"\n{title}: {total} samples holding a GIL")
    for name, count in centres.most_common():
        print(f"  {count / total:6.1%}  {name}")
    print("  functions with the most samples of their own:")
    for name, count in own.most_common(12):
        print(f"  {count / total:6.1%}  {name}")


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile(
    pid: int, seconds: int, out: Path, *, children: bool = False
) -> subprocess.Popen[bytes]:
    """py-spy on ``pid`` (and, with ``children``, its worker processes: SMTP parses
    in a process pool)."""
    return subprocess.Popen(
        [
            shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            # Only samples holding the GIL: the work one process can do is what its
            # one GIL allows, and a thread waiting in fsync or on a queue is not it.
            "--gil",
            "--output",
            str(out),
            *(["--subprocesses"] if children else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--only", choices=("http", "smtp"), help="profile one role")
    parser.add_argument(
        "--keep", type=Path, help="copy py-spy's raw (collapsed) stacks into this directory"
    )
    args = parser.parse_args()
    switchboard = str(Path(sys.executable).with_name("switchboard"))
    with tempfile.TemporaryDirectory() as data:
        base = {
            **os.environ,
            "SWITCHBOARD_DATA_DIR": data,
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
        }
        broker = subprocess.Popen(
            [switchboard, "broker"], env=base, stdout=subprocess.PIPE, text=True
        )
        try:
            bootstrap = broker.stdout.readline().strip()  # type: ignore[union-attr]
            base["SWITCHBOARD_KAFKA_BOOTSTRAP"] = bootstrap
            subprocess.run([switchboard, "topics", "create"], env=base, check=True)
            if args.only in (None, "http"):
                _http(switchboard, base, Path(data), args.seconds, args.keep)
            if args.only in (None, "smtp"):
                _smtp(switchboard, base, args.seconds, args.keep)
        finally:
            broker.kill()
            broker.wait(10)


def _keep(raw: Path, keep: Path | None) -> None:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, keep / raw.name)


def _http(
    switchboard: str, base: dict[str, str], data: Path, seconds: int, keep: Path | None
) -> None:
    port = free_port()
    config = data / "switchboard.toml"
    config.write_text(HOOK_CONFIG)
    env = {
        **base,
        "SWITCHBOARD_HTTP_PORT": str(port),
        "SWITCHBOARD_CONFIG": str(config),
        "SWITCHBOARD_TWILIO_AUTH_TOKEN": TOKEN,
        "BENCH_SECRET": SECRET,
    }
    server = subprocess.Popen(
        [switchboard, "ingest", "http", "--workers", "1"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        if not wait_for_port("127.0.0.1", port, 30):
            raise SystemExit("ingest http did not start")
        time.sleep(1)
        makers = (("twilio", twilio_request), ("json-hook", json_hook_request))
        for name, make in makers:
            url = make(port)[0]

            def fresh(n: str, make: Callable[[int, str], Request] = make) -> Request:
                return make(port, n)

            # Every request a new message (a new blob to write), as real traffic is.
            made = [fresh_script(fresh, 60_000, f"{time.time_ns()}-{p}") for p in "wm"]
            try:
                wrk(url, made[0][0], 2, 64)  # warm up
                out = data / f"{name}.txt"
                spy = profile(server.pid, seconds, out)
                time.sleep(0.5)
                rate, p50, p99, bad = wrk(url, made[1][0], seconds, 64)
                spy.wait(seconds + 30)
            finally:
                for path in (path for pair in made for path in pair):
                    os.unlink(path)
            _keep(out, keep)
            summarize(
                out,
                f"{name} c=64, new messages: {rate:,.0f} req/s, p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms, {bad} non-2xx (under the profiler)",
            )
    finally:
        server.terminate()
        server.wait(15)


def _smtp(switchboard: str, base: dict[str, str], seconds: int, keep: Path | None) -> None:
    port = free_port()
    env = {
        **base,
        "SWITCHBOARD_SMTP_PORT": str(port),
        "SWITCHBOARD_SMTP_DOMAINS": "example.com",
        "SWITCHBOARD_SMTP_HOSTNAME": "bench",
        "SWITCHBOARD_SMTP_VERIFY": "false",  # no DNS here; bench-smtp-auth measures it
        # One load generator on one address: the per-client limit is for strangers.
        "SWITCHBOARD_SMTP_MAX_SESSIONS_PER_CLIENT": "1000",
    }
    server = subprocess.Popen(
        [switchboard, "ingest", "smtp", "--workers", "1"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        if not wait_for_port("127.0.0.1", port, 30):
            raise SystemExit("ingest smtp did not start")
        messages = corpus(2000)
        asyncio.run(drive(port, messages[:300], 16))  # warm up
        out = Path(tempfile.gettempdir()) / f"smtp-{os.getpid()}.txt"
        stop = threading.Event()
        sent = [0]
        sender = threading.Thread(
            target=lambda: asyncio.run(_smtp_load(port, messages, stop, sent)), daemon=True
        )
        started = time.perf_counter()
        sender.start()
        time.sleep(0.5)
        spy = profile(server.pid, seconds, out, children=True)
        spy.wait(seconds + 30)
        stop.set()
        sender.join(30)
        _keep(out, keep)
        summarize(
            out,
            f"smtp 16 connections: {sent[0] / (time.perf_counter() - started):,.0f} msg/s "
            "(under the profiler)",
        )
        out.unlink(missing_ok=True)
    finally:
        server.kill()
        server.wait(15)


async def _smtp_load(
    port: int, messages: list[bytes], stop: threading.Event, sent: list[int]
) -> None:
    """16 connections sending the corpus round and round until ``stop``."""

    async def one(share: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        writer.write(b"EHLO bench.example.org\r\n")
        await _reply(reader)
        while not stop.is_set():
            for raw in share:
                await send_data(reader, writer, raw)
                # Awaited first: `sent[0] += await ...` would read the count before
                # the await and lose the other connections' increments.
                answer = await _reply(reader)
                sent[0] += answer.startswith(b"250")
                if stop.is_set():
                    break
        writer.close()

    await asyncio.gather(*(one(messages[i::16]) for i in range(16)))


if __name__ == "__main__":
    main()
