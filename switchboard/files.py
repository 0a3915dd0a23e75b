"""Durable directories: what a rename or a new directory needs before it survives a crash.

A file fsynced and renamed into place is durable only once its directory entry
is on disk (an fsync of the directory), and a directory created for it only once
*its* entry is on disk in its parent. Missing the second loses every file of a
fresh directory on a crash, after the writer reported them safe.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableSet
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Make ``directory``'s entries (renames, new files, new subdirectories) durable."""
    _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """Make ``path``'s bytes durable (a file someone else may have just written)."""
    _fsync_path(path, os.O_RDONLY)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, base: Path, known: MutableSet[Path]) -> None:
    """Create ``directory`` and the levels between it and ``base`` (both included), each
    level's entry made durable in its parent the first time this process meets it.

    The first time, not only when this call created it: another thread or process may
    have created it a moment ago and not yet fsynced its parent, and mkdir cannot
    tell that from a directory made long ago. ``known`` (the caller's, kept for the
    process's life) holds the levels already made durable, so each costs one fsync
    per process.
    """
    for level in made_dirs(directory, base, known):
        fsync_dir(level.parent)
        known.add(level)


def made_dirs(directory: Path, base: Path, known: MutableSet[Path]) -> list[Path]:
    """:func:`make_dirs` without the fsyncs: creates the levels and returns those not in
    ``known``, top first, for a caller that makes their entries durable itself (one
    sync of the whole file system for many) and then adds them to ``known``."""
    if directory in known:
        return []
    chain = [directory, *directory.parents]
    if base not in chain:
        raise ValueError(f"{directory} is not under {base}")
    levels = [level for level in reversed(chain[: chain.index(base) + 1]) if level not in known]
    for level in levels:
        level.mkdir(parents=True, exist_ok=True)
    return levels


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A small JSON report a process left for `switchboard status` (the last recovery,
    the archive's state); None when it is missing, unreadable or not an object."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
