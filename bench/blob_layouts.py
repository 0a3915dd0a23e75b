"""What a small blob costs to store durably, as files and as packs (`make bench-blobs`).

Writes ``--groups`` groups of ``--group`` fresh blobs of ``--size`` bytes with the
real stores' ``put_many`` (what the edges' group commit calls), two writer threads
at a time as ``GroupCommit`` runs them, into a new directory under ``--dir`` (the
data directory's file system by default: a tmpfs would measure nothing). Prints
wall-clock and CPU time (user, kernel) a blob for each layout, alternated
``--rounds`` times. CPU is this process's only: the kernel's write-back threads
are not counted, so the files layout's real cost is higher than printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normalize.content import Blob
from switchboard.blobs import FileBlobStore, PackBlobStore


def _run(layout: str, where: Path, groups: list[list[Blob]]) -> tuple[float, float, float]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-{layout}-", dir=where))
    store = FileBlobStore(root) if layout == "files" else PackBlobStore(root)
    try:
        with ThreadPoolExecutor(2) as pool:
            wall, cpu = time.perf_counter(), os.times()
            list(pool.map(store.put_many, groups))
            wall, after = time.perf_counter() - wall, os.times()
        n = sum(len(g) for g in groups)
        return wall / n, (after.user - cpu.user) / n, (after.system - cpu.system) / n
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1500)
    parser.add_argument("--group", type=int, default=8, help="blobs a put_many")
    parser.add_argument("--size", type=int, default=2048, help="bytes a blob")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("var"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.groups} groups of {args.group} blobs of {args.size} bytes, in {args.dir}")
    print(f"{'layout':8} {'wall µs/blob':>13} {'user µs':>8} {'kernel µs':>10}")
    for _ in range(args.rounds):
        for layout in ("files", "packs"):
            groups = [
                [
                    Blob.of(os.urandom(args.size), "application/octet-stream")
                    for _ in range(args.group)
                ]
                for _ in range(args.groups)
            ]
            wall, user, kernel = _run(layout, args.dir, groups)
            print(
                f"{layout:8} {wall * 1e6:13.1f} {user * 1e6:8.1f} {kernel * 1e6:10.1f}", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
