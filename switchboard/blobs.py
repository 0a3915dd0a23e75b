"""Content-addressed blob store: raw MIME and attachments, by SHA-256 (claim check).

Events carry :class:`normalize.schema.BlobRef` references and stay small. The
filesystem store is the default; the :class:`BlobStore` protocol is what an S3
(or other) store implements.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from normalize.content import Blob
from normalize.schema import BlobRef

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobNotFound(KeyError):
    """No blob with that digest."""


class BlobStore(Protocol):
    def put(self, blob: Blob) -> BlobRef:
        """Store durably (idempotent: the same bytes are stored once)."""

    def get(self, sha256: str) -> bytes:
        """The stored bytes; raises :class:`BlobNotFound`."""

    def exists(self, sha256: str) -> bool: ...


class FileBlobStore:
    """Blobs as files ``root/ab/cd/abcd...``, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[Path] = set()  # fan-out directories known to exist

    def _path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise BlobNotFound(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def put(self, blob: Blob) -> BlobRef:
        path = self._path(blob.ref.sha256)
        if path.is_file() and path.stat().st_size == blob.ref.size:
            return blob.ref
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(blob.data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return blob.ref

    def get(self, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc
