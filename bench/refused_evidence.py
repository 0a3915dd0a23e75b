"""Disk written by refused requests: unsigned large posts to the Twilio route.

Usage: .venv/bin/python bench/refused_evidence.py [--posts 200] [--kb 250]

Starts `switchboard ingest http` (embedded broker, a fresh data directory, a Twilio
token configured) and sends ``--posts`` unsigned form posts of ``--kb`` KB each over
one keep-alive connection, as a stranger would. Prints the answers, the time taken,
the blob directory's size and file count before and after, and the evidence
counter of /metrics. Before issue 16 every such post was stored whole (fsynced).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from switchboard.broker import free_port, wait_for_port


def blob_usage(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--kb", type=int, default=250)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
            "SWITCHBOARD_DATA_DIR": data,
            "SWITCHBOARD_HTTP_PORT": str(port),
            "SWITCHBOARD_TWILIO_AUTH_TOKEN": "bench-twilio-token",
            "SWITCHBOARD_LOG_LEVEL": "ERROR",
            "SWITCHBOARD_CONFIG": str(Path(data) / "none.toml"),
            "SWITCHBOARD_KAFKA_EMBEDDED": "true",  # `ingest http` alone, its own broker
        }
        (Path(data) / "none.toml").write_text("")
        server = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "ingest", "http"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if not wait_for_port("127.0.0.1", port, 60):
                raise SystemExit("switchboard ingest http did not start")
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=30) as client:
                deadline = time.monotonic() + 60
                while client.get(f"{base}/readyz").status_code != 200:
                    if time.monotonic() > deadline:
                        raise SystemExit("not ready")
                    time.sleep(0.2)
                before = blob_usage(Path(data) / "blobs")
                size = args.kb * 1024
                answers: Counter[int] = Counter()
                started = time.perf_counter()
                for n in range(args.posts):
                    head = f"MessageSid=SM{n:032x}&Body=".encode()
                    response = client.post(
                        f"{base}/webhooks/twilio/sms",
                        content=head + b"x" * (size - len(head)),
                        headers={"content-type": "application/x-www-form-urlencoded"},
                    )
                    answers[response.status_code] += 1
                elapsed = time.perf_counter() - started
                after = blob_usage(Path(data) / "blobs")
                metrics = client.get(f"{base}/metrics").text
        finally:
            server.terminate()
            server.wait(30)
    dropped = re.findall(r'switchboard_evidence_dropped_total\{adapter="twilio"\} (\S+)', metrics)
    print(
        f"{args.posts} unsigned posts of {args.kb} KB: answers {dict(answers)} in {elapsed:.1f} s"
    )
    print(f"blobs before: {before[0]} files, {before[1]} bytes")
    print(f"blobs after:  {after[0]} files, {after[1]} bytes (+{after[1] - before[1]})")
    print(f"switchboard_evidence_dropped_total{{adapter=twilio}}: {dropped[0] if dropped else 0}")


if __name__ == "__main__":
    main()
