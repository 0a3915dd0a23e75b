"""The file blob store: what it makes durable, and in which order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from normalize.content import Blob
from switchboard.blobs import FileBlobStore


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_new_fan_out_directories_are_made_durable_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "blobs"
    store = FileBlobStore(root)
    synced = _record_fsyncs(monkeypatch)
    blob = Blob.of(b"hello", "text/plain")
    store.put(blob)
    digest = blob.ref.sha256
    first, second = root / digest[:2], root / digest[:2] / digest[2:4]
    assert (second / digest).read_bytes() == b"hello"
    # The new directories' entries in their parents, the file, then its rename.
    assert synced[:2] == [str(root), str(first)]
    assert synced[2].startswith(str(second / ".tmp-"))
    assert synced[3:] == [str(second)]


def test_existing_directories_cost_only_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = Blob.of(b"hello", "text/plain")
    digest = blob.ref.sha256
    directory = tmp_path / digest[:2] / digest[2:4]
    directory.mkdir(parents=True)
    synced = _record_fsyncs(monkeypatch)
    FileBlobStore(tmp_path).put(blob)
    assert len(synced) == 2
    assert synced[1] == str(directory)


def test_a_blob_already_stored_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    blob = Blob.of(b"hello", "text/plain")
    store.put(blob)
    synced = _record_fsyncs(monkeypatch)
    store.put(blob)
    assert synced == []
