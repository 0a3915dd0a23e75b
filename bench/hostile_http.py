"""Server memory under oversized unauthenticated posts (issue 16).

Usage: .venv/bin/python bench/hostile_http.py [--size-mb 100] [--parallel 8]

Starts `switchboard run` (embedded broker, the queue API and page, a public form
hook) as a subprocess and, for each target, sends ``--parallel`` posts of
``--size-mb`` MB at once without credentials: once with a declared
Content-Length, once chunked (no length, so only counting the streamed bytes
can stop it). It samples the server process's RSS throughout and prints the
growth over the RSS before the attack (target: under 50 MB), and how much of
each body the client got out before the server answered.

Then a crowd (``--crowd``, 0 to skip): that many clients, each from an address of
its own (127.0.0.10 and up, so no per-client cap applies), each declaring a
``--crowd-mb`` MB body to the Mailgun route (whose signature is inside the body,
so the body must be read to check it), sending all of it but its last KB and
then holding it ``--hold-s`` seconds before giving up: what they make the server
hold at once, against ``SWITCHBOARD_HTTP_MAX_BODY_IN_FLIGHT`` (``--budget-mb``;
a budget larger than the crowd is the server without one).

Then documents (``--documents``, 0 to skip): that many strangers, each from an
address of its own, posting valid 1 MB JSON documents of 80,000 small keys back to
back to a public hook (its limits at their defaults) for ``--documents-seconds``,
while 127.0.0.1 times /healthz and a small form post: what the walks over such a
document cost everyone else.

Then slowloris: ``--slow`` connections from 127.0.0.2 sending one header byte
a second for ``--slow-seconds``, while 127.0.0.1 asks for /healthz every
50 ms; it prints how many of the stranger's connections the server accepted
and still held, and the /healthz latencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from switchboard.broker import free_port, wait_for_port

MB = 1024 * 1024
TARGETS = {
    "api-status": ("/api/conversations/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/status", "json"),
    "queue-login": ("/queue/login", "form"),
    "form-hook": ("/webhooks/contact", "form"),
}
TYPES = {"json": "application/json", "form": "application/x-www-form-urlencoded"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(port: int, path: str, content_type: str, size: int, chunked: bool) -> tuple[int, int]:
    """(status, body bytes sent before the answer)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    # An allowed Host: any other is refused (400) before the body limits are reached.
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {content_type}\r\n{framing}\r\n\r\n"
    )
    filler = b"a" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        while sent < size and not select.select([sock], [], [], 0)[0]:
            piece = f"{len(filler):x}\r\n".encode() + filler + b"\r\n" if chunked else filler
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += len(filler)
        try:
            answer = sock.recv(65536)
        except OSError:
            return 0, sent
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, sent


def slowloris(port: int, count: int, seconds: float) -> None:
    """Open ``count`` connections from 127.0.0.2 and trickle header bytes into
    them while timing /healthz from 127.0.0.1."""
    opened: list[socket.socket] = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", port), 5, source_address=("127.0.0.2", 0))
            sock.setblocking(False)  # a timeout socket would wait in recv below
            opened.append(sock)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    header = b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
    alive = list(opened)
    deadline = time.monotonic() + seconds
    position = 0
    history: list[int] = []
    while time.monotonic() < deadline and alive:
        still = []
        for sock in alive:
            try:
                sock.send(header[position : position + 1])
                # Anything to read (a 429, or the end of the stream) means closed by
                # the server. (select() cannot take descriptors past 1024.)
                sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                still.append(sock)
                continue
            except OSError:
                pass
            sock.close()
        alive = still
        history.append(len(alive))
        position += 1
        time.sleep(1)
    stop.set()
    prober.join()
    for sock in alive:
        sock.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    marks = [history[second] for second in (0, 2, 5, 8, 11) if second < len(history)]
    print(
        f"slowloris    {len(opened)} connections from 127.0.0.2, one byte a second; "
        f"still open after 1, 3, 6, 9, 12 s: {marks}"
        f", after {position} s: {len(alive)}; /healthz from 127.0.0.1: {len(latencies)} requests, "
        f"p50 {p50:.1f} ms, max {latencies[-1]:.1f} ms"
    )


def documents(port: int, clients: int, seconds: float) -> None:
    """``clients`` strangers (127.0.0.10 and up) posting, back to back for ``seconds``,
    valid 1 MB JSON documents of 80,000 small keys to a public hook (every limit
    at its default), while 127.0.0.1 times /healthz and a small form post."""
    doc = json.dumps(
        {"email": "big@example.org", "text": "hi", **{f"k{n}": 1 for n in range(80_000)}}
    ).encode()
    stop = threading.Event()
    statuses: dict[int, int] = {}
    timings: dict[str, list[float]] = {"/healthz": [], "form post": []}

    def attack(source: str) -> None:
        with httpx.Client(
            transport=httpx.HTTPTransport(local_address=source), timeout=60
        ) as client:
            while not stop.is_set():
                status = client.post(
                    f"http://127.0.0.1:{port}/webhooks/documents",
                    content=doc,
                    headers={"content-type": "application/json"},
                ).status_code
                statuses[status] = statuses.get(status, 0) + 1
                if status == 429:
                    time.sleep(0.05)

    def probe() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            n = 0
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                timings["/healthz"].append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                n += 1
                client.post(
                    "/webhooks/contact", data={"email": f"p{n}@example.com", "text": "hello"}
                ).raise_for_status()
                timings["form post"].append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)

    workers = [threading.Thread(target=attack, args=(f"127.0.0.{10 + n}",)) for n in range(clients)]
    prober = threading.Thread(target=probe)
    for thread in [*workers, prober]:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in [*workers, prober]:
        thread.join()
    for name, values in timings.items():
        values.sort()
        print(
            f"documents    {clients} x 1 MB JSON ({len(doc):,} bytes, 80,000 keys) back to back "
            f"for {seconds:g} s, answers {dict(sorted(statuses.items()))}; {name} from "
            f"127.0.0.1: {len(values)} requests, p50 {values[len(values) // 2]:.1f} ms, "
            f"p99 {values[int(len(values) * 0.99)]:.1f} ms, max {values[-1]:.1f} ms"
        )


def oversized(port: int, pid: int, size_mb: int, parallel: int) -> None:
    """``parallel`` posts of ``size_mb`` MB to each target at once; RSS growth."""
    size = size_mb * MB
    peak = 0.0
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.02)

    worst = 0.0
    for name, (path, kind) in TARGETS.items():
        for chunked in (False, True):
            before = rss_mb(pid)
            peak = before
            sampling = True
            sampler = threading.Thread(target=sample)
            sampler.start()
            with ThreadPoolExecutor(parallel) as pool:
                futures = [
                    pool.submit(post, port, path, TYPES[kind], size, chunked)
                    for _ in range(parallel)
                ]
                results = [future.result() for future in futures]
            time.sleep(0.2)
            sampling = False
            sampler.join()
            grew = peak - before
            worst = max(worst, grew)
            statuses = sorted({status for status, _ in results})
            most = max(sent for _, sent in results) / MB
            framing = "chunked" if chunked else "declared"
            print(
                f"{name:<12} {framing:<8} {parallel} x {size_mb} MB: "
                f"answers {statuses}, at most {most:.1f} MB sent, "
                f"RSS {before:.0f} MB, peak +{grew:.1f} MB"
            )
    verdict = "ok" if worst < 50 else "OVER TARGET"
    print(f"worst RSS growth: {worst:.1f} MB (target < 50 MB): {verdict}")


def _hold(port: int, source: str, size: int, hold_s: float) -> tuple[int, int]:
    """One crowd member: (status, or 0 if it was still being read when it gave up;
    body bytes sent)."""
    head = (
        "POST /webhooks/mailgun HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {size}\r\n\r\n"
    )
    filler = b"a" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), 30, (source, 0)) as sock:
        sock.sendall(head.encode())
        while sent < size - 1024 and not select.select([sock], [], [], 0)[0]:
            piece = filler[: size - 1024 - sent]
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += len(piece)
        if not select.select([sock], [], [], hold_s)[0]:
            return 0, sent
        try:
            answer = sock.recv(65536)
        except OSError:
            return 0, sent
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0), sent


def crowd(port: int, pid: int, count: int, size_mb: int, hold_s: float) -> None:
    """``count`` clients holding ``size_mb`` MB bodies at once; RSS growth."""
    before = rss_mb(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(_hold, port, f"127.0.{1 + n // 200}.{10 + n % 200}", size_mb * MB, hold_s)
            for n in range(count)
        ]
        results = [future.result() for future in futures]
    done.set()
    sampler.join()
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    held = sum(sent for status, sent in results if status == 0) / MB
    print(
        f"crowd        {count} x {size_mb} MB from {count} addresses, held {hold_s:g} s: "
        f"answers {dict(sorted(statuses.items()))} (0: still being read), "
        f"{held:.0f} MB sent by those still being read; RSS {before:.0f} MB, "
        f"peak +{peak - before:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--crowd", type=int, default=48)
    parser.add_argument("--crowd-mb", type=int, default=25)
    parser.add_argument("--hold-s", type=float, default=5)
    parser.add_argument("--budget-mb", type=int, default=512)
    parser.add_argument("--skip-oversized", action="store_true")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--documents-seconds", type=float, default=15)
    parser.add_argument("--slow", type=int, default=4000)
    parser.add_argument("--slow-seconds", type=float, default=20)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        config = Path(data) / "switchboard.toml"
        config.write_text(
            '[[webhooks]]\nname = "contact"\nauth = { kind = "none" }\n'
            'map = { email = "email", text = "text" }\ncontent_types = ["form"]\n'
            '[[webhooks]]\nname = "documents"\nauth = { kind = "none" }\n'
            'map = { email = "email", text = "text" }\ncontent_types = ["json"]\n'
            "[adapters.mailgun]\nmax_age_s = 3600\n"  # with the signing key: mounted
        )
        env = {
            **os.environ,
            "SWITCHBOARD_HTTP_PORT": str(port),
            "SWITCHBOARD_SMTP_ENABLED": "false",
            "SWITCHBOARD_DATA_DIR": data,
            "SWITCHBOARD_CONFIG": str(config),
            "SWITCHBOARD_LOG_LEVEL": "ERROR",
            "SWITCHBOARD_API_TOKEN": "bench-token",
            "SWITCHBOARD_MAILGUN_SIGNING_KEY": "bench-mailgun-key",
            "SWITCHBOARD_HTTP_MAX_BODY_IN_FLIGHT": str(args.budget_mb * MB),
        }
        env.pop("SWITCHBOARD_KAFKA_BOOTSTRAP", None)
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("switchboard")), "run"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            if not wait_for_port("127.0.0.1", port, 60):
                raise SystemExit("switchboard did not start")
            time.sleep(2)  # let the router and sink settle
            if not args.skip_oversized:
                oversized(port, server.pid, args.size_mb, args.parallel)
            if args.crowd:
                crowd(port, server.pid, args.crowd, args.crowd_mb, args.hold_s)
            if args.documents:
                documents(port, args.documents, args.documents_seconds)
            if args.slow:
                slowloris(port, args.slow, args.slow_seconds)
        finally:
            server.terminate()
            server.wait(20)


if __name__ == "__main__":
    main()
