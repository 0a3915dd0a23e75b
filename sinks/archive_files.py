"""Where archive files live: the Hive layout, and a file appearing whole or not at all.

``<root>/topic=<topic>/date=<YYYY-MM-DD>/part-<partition>-<first>-<last>.parquet``,
offsets inclusive. The names are the archive's own record of what it holds: after a
crash the sink lists them to learn where each partition's archive ends, so a range
is never written twice, and a range that is written again replaces the files it
covers instead of doubling their rows.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from switchboard.files import fsync_dir, make_dirs

PART = re.compile(r"^part-(\d+)-(\d+)-(\d+)\.parquet$")


@dataclass(frozen=True)
class Part:
    """One archive file: a contiguous run of one partition's offsets."""

    topic: str
    day: str
    partition: int
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"part-{self.partition}-{self.first}-{self.last}.parquet"

    @property
    def relative(self) -> str:
        return f"topic={self.topic}/date={self.day}/{self.name}"


class Archive(Protocol):
    """Where the sink keeps its files: a local directory, or an object store."""

    def parts(self, topic: str, partition: int) -> list[Part]: ...

    def write(self, part: Part, payload: bytes) -> None: ...

    def remove(self, part: Part) -> None: ...

    def retire(self, part: Part, tag: str) -> None: ...


def open_archive(root: str, storage_options: dict[str, Any] | None = None) -> Archive:
    """A local path (or ``file://``), or any fsspec URL (``s3://bucket/prefix``)."""
    if "://" not in root or root.startswith("file://"):
        return LocalArchive(Path(root.removeprefix("file://")))
    return FsspecArchive(root, storage_options or {})


class LocalArchive:
    """The archive on a local (or mounted) file system.

    A file is written under a hidden temporary name (``.part-…tmp``, which Hive,
    Spark, Trino and DuckDB globs on ``*.parquet`` all skip), fsynced, renamed into
    place and its directory fsynced: a crash leaves the old state or the new one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[Path] = set()  # directories known to exist, their entries durable

    def __repr__(self) -> str:
        return f"LocalArchive({str(self.root)!r})"

    def parts(self, topic: str, partition: int) -> list[Part]:
        """The files of one partition on the newest day that has any (the sink needs
        the end, not the whole history). Removes that partition's temporary files a
        crash left there: only the partition's one writer calls this."""
        base = self.root / f"topic={topic}"
        if not base.is_dir():
            return []
        days = sorted(
            (d.name.removeprefix("date=") for d in base.iterdir() if d.name.startswith("date=")),
            reverse=True,
        )
        for day in days:
            found = []
            for entry in (base / f"date={day}").iterdir():
                if entry.name.startswith(f".part-{partition}-") and entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)  # a crash's half-written file: never visible
                    continue
                match = PART.match(entry.name)
                if match and int(match[1]) == partition:
                    found.append(Part(topic, day, partition, int(match[2]), int(match[3])))
            if found:
                return found
        return []

    def write(self, part: Part, payload: bytes) -> None:
        directory = self.root / f"topic={part.topic}" / f"date={part.day}"
        # A new day's (or topic's) directory must survive a crash with the file in it.
        make_dirs(directory, self.root, self._dirs)
        final = directory / part.name
        temporary = directory / f".{part.name}.tmp"
        with temporary.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(final)
        fsync_dir(directory)

    def remove(self, part: Part) -> None:
        directory = self.root / f"topic={part.topic}" / f"date={part.day}"
        (directory / part.name).unlink(missing_ok=True)
        fsync_dir(directory)

    def retire(self, part: Part, tag: str) -> None:
        directory = self.root / f"topic={part.topic}" / f"date={part.day}"
        (directory / part.name).rename(directory / f"{tag}-{part.name}")
        fsync_dir(directory)


class FsspecArchive:
    """The archive on an fsspec file system (S3 through s3fs, GCS, Azure...).

    An object store's PUT is atomic: an object is visible whole or not at all, so
    no temporary name is needed. Credentials come from the file system's usual
    places (for S3: ``AWS_*`` variables, the shared config, an instance role).
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec  # noqa: PLC0415 - only archives on an object store need it

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)

    def __repr__(self) -> str:
        return f"FsspecArchive({self.url!r})"

    def parts(self, topic: str, partition: int) -> list[Part]:
        base = f"{self.root}/topic={topic}"
        self.fs.invalidate_cache()  # another writer may have written since
        if not self.fs.exists(base):
            return []
        days = sorted(
            (
                name.rsplit("/", 1)[-1].removeprefix("date=")
                for name in self.fs.ls(base, detail=False)
                if name.rsplit("/", 1)[-1].startswith("date=")
            ),
            reverse=True,
        )
        for day in days:
            found = []
            for name in self.fs.ls(f"{base}/date={day}", detail=False):
                match = PART.match(name.rsplit("/", 1)[-1])
                if match and int(match[1]) == partition:
                    found.append(Part(topic, day, partition, int(match[2]), int(match[3])))
            if found:
                return found
        return []

    def write(self, part: Part, payload: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{part.relative}", payload)

    def remove(self, part: Part) -> None:
        self.fs.rm_file(f"{self.root}/{part.relative}")

    def retire(self, part: Part, tag: str) -> None:
        directory = f"{self.root}/topic={part.topic}/date={part.day}"
        self.fs.mv(f"{directory}/{part.name}", f"{directory}/{tag}-{part.name}")
