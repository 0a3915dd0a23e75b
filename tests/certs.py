"""Self-signed certificates for TLS tests (openssl from Debian)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for ``common_name``, 127.0.0.1 and localhost, and its key."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{common_name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
