"""A real S3-protocol server on loopback for the archive tests: moto's server mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from switchboard.broker import free_port
from tests import local_http

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def options(self) -> dict[str, Any]:
        """fsspec storage options for this server (the archive's ``storage_options``)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def filesystem(self) -> Any:  # noqa: ANN401 - an s3fs.S3FileSystem
        import s3fs  # noqa: PLC0415

        return s3fs.S3FileSystem(**self.options())

    def download(self, url: str, target: Path) -> Path:
        """Copy everything under an ``s3://`` URL to ``target`` (DuckDB reads it there)."""
        fs = self.filesystem()
        fs.invalidate_cache()
        root = url.removeprefix("s3://").rstrip("/")
        for path in fs.find(root):
            local = target / Path(path).relative_to(root)
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(fs.cat_file(path))
        return target


@contextmanager
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert binary is not None, "moto[server] is not installed (pip install -e '.[dev]')"
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                local_http.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not answer"
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        process.kill()
        process.wait(10)
