"""Concurrent messages share their blob writes, against the real broker and the
real file system: every sender is acknowledged only with its raw bytes on disk,
and fewer writes happen than messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from ingest.handoff import HandOff
from normalize.content import Blob, Normalized
from switchboard.blobs import FileBlobStore, PackBlobStore
from switchboard.kafka import Publisher
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests.factories import inbound_message

pytestmark = pytest.mark.integration

WRITES = "switchboard_blob_group_commit_blobs_count"
BLOBS = "switchboard_blob_group_commit_blobs_sum"


@pytest.mark.parametrize("layout", [FileBlobStore, PackBlobStore])
def test_sixty_four_concurrent_messages_share_blob_writes(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, layout: type[FileBlobStore]
) -> None:
    store = layout(tmp_path / "blobs")
    raws = [Blob.of(f"raw {unique} {i}".encode(), "application/json") for i in range(64)]
    messages = [
        Normalized(message=inbound_message(raw=raw.ref, subject=f"{unique} {i}"), blobs=(raw,))
        for i, raw in enumerate(raws)
    ]
    writes, blobs = REGISTRY.get_sample_value(WRITES) or 0, REGISTRY.get_sample_value(BLOBS) or 0
    publisher = Publisher(kafka_settings)
    handoff = HandOff(publisher, store)
    on_disk_at_ack: list[bool] = []

    async def deliver(message: Normalized) -> None:
        receipt = await handoff.deliver(message)
        assert receipt.ack is not None
        assert receipt.ack.topic == INBOUND
        # Read by another store, as another process would.
        reader = layout(tmp_path / "blobs")
        on_disk_at_ack.append(all(reader.get(b.ref.sha256) == b.data for b in message.blobs))
        reader.close()

    async def main() -> None:
        await asyncio.gather(*(deliver(m) for m in messages))

    try:
        asyncio.run(main())
    finally:
        handoff.close()
        publisher.close()
    assert on_disk_at_ack == [True] * 64
    assert (REGISTRY.get_sample_value(BLOBS) or 0) - blobs == 64
    shared = (REGISTRY.get_sample_value(WRITES) or 0) - writes
    assert 1 <= shared < 64, shared  # they arrived together: they shared writes
