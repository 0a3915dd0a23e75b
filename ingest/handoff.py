"""The durable hand-off every adapter calls: store the blobs, then publish.

It returns only once the message is durable (blobs fsynced, and the event
acknowledged by Kafka with acks=all or fsynced into the local spool) and raises
:class:`RetryLater` otherwise, so an adapter answers its sender after this
returns, and with a retry-later answer when it raises. Re-delivering the same
message is harmless: blobs are content-addressed and the dedupe key is stable.

With a spool, Kafka gets a short bound (``spool_after_s``) to acknowledge; past
it the event is spooled. While the spool holds anything, new events queue
behind it instead of overtaking it, so they reach Kafka in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from pydantic import JsonValue

from ingest.errors import RetryLater
from ingest.spool import Spool, SpoolFull
from normalize.content import Blob, Normalized
from normalize.schema import DeadLetter
from switchboard.blobs import BlobStore
from switchboard.events import TYPE_DEADLETTER, TYPE_INBOUND, Event
from switchboard.kafka import Ack, Publisher, PublishError
from switchboard.metrics import ACCEPTED, DEAD_LETTERED, HANDOFF_SECONDS, SPOOLED
from switchboard.topics import DEADLETTER, INBOUND

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """How a hand-off became durable: Kafka's acknowledgement, or the spool."""

    ack: Ack | None

    @property
    def spooled(self) -> bool:
        return self.ack is None


class HandOff:
    def __init__(
        self,
        publisher: Publisher,
        blobs: BlobStore,
        source: str = "/switchboard",
        io_threads: int = 16,
        *,
        spool: Spool | None = None,
        spool_after_s: float = 2.0,
    ) -> None:
        self._publisher = publisher
        self._blobs = blobs
        self._source = source
        self.spool = spool
        self._spool_after_s = spool_after_s
        # Blob writes wait on fsync, which releases the GIL: many can overlap. A pool of
        # their own keeps them from queueing behind CPU work on the default executor.
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="blob-io")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    async def _store(self, blobs: tuple[Blob, ...]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, lambda: [self._blobs.put(b) for b in blobs])
        except OSError as exc:
            log.error("blob store write failed", extra={"error": repr(exc)})
            raise RetryLater(f"cannot store the message: {exc.strerror or exc}") from exc

    async def _publish(self, topic: str, event: Event) -> Receipt:
        spool = self.spool
        if spool is not None and spool.messages:
            return await self._to_spool(spool, topic, event, "spool not yet drained")
        timeout = self._spool_after_s if spool is not None else None
        try:
            return Receipt(await self._publisher.apublish(topic, event, timeout_s=timeout))
        except PublishError as exc:
            if spool is not None:
                return await self._to_spool(spool, topic, event, str(exc))
            log.warning(
                "hand-off not acknowledged",
                extra={"topic": topic, "event_id": event.id, "error": str(exc)},
            )
            raise RetryLater(f"message broker unavailable: {exc}") from exc

    async def _to_spool(self, spool: Spool, topic: str, event: Event, why: str) -> Receipt:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, spool.append, topic, event)
        except SpoolFull as exc:
            log.error("spool full: refusing", extra={"event_id": event.id, "error": str(exc)})
            raise RetryLater(f"message broker unavailable and {exc}") from exc
        except OSError as exc:
            raise RetryLater(f"message broker unavailable and {exc}") from exc
        SPOOLED.inc()
        log.info("spooled", extra={"event_id": event.id, "topic": topic, "why": why})
        return Receipt(None)

    async def deliver(self, normalized: Normalized) -> Receipt:
        """Make one normalized message durable; raise RetryLater if it is not."""
        started = time.perf_counter()
        message = normalized.message
        await self._store(normalized.blobs)
        receipt = await self._publish(
            INBOUND,
            Event(
                type=TYPE_INBOUND,
                source=f"{self._source}/ingest/{message.adapter}",
                key=message.partition_key,
                data=message,
                subject=str(message.id),
            ),
        )
        log.info(
            "message accepted",
            extra={
                "message_id": str(message.id),
                "dedupe_key": message.dedupe_key,
                "channel": message.channel,
                "adapter": message.adapter,
                "spooled": receipt.spooled,
                "partition": receipt.ack.partition if receipt.ack else None,
                "offset": receipt.ack.offset if receipt.ack else None,
            },
        )
        HANDOFF_SECONDS.labels(message.adapter).observe(time.perf_counter() - started)
        ACCEPTED.labels(message.adapter, "spool" if receipt.spooled else "kafka").inc()
        return receipt

    async def dead_letter(
        self,
        *,
        id: UUID,
        adapter: str,
        reason: str,
        detail: str,
        raw: Blob | None = None,
        stage: Literal["ingest", "normalize", "router", "sink"] = "ingest",
        metadata: dict[str, JsonValue] | None = None,
    ) -> Receipt:
        """Record what could not become a message, with the raw bytes kept."""
        if raw is not None:
            await self._store((raw,))
        record = DeadLetter(
            id=id,
            stage=stage,
            adapter=adapter,
            reason=reason[:64],
            detail=detail[:4000],
            occurred_at=datetime.now(UTC),
            raw=raw.ref if raw is not None else None,
            metadata=metadata or {},
        )
        receipt = await self._publish(
            DEADLETTER,
            Event(
                type=TYPE_DEADLETTER,
                source=f"{self._source}/ingest/{adapter}",
                key=f"deadletter:{adapter}",
                data=record,
                subject=str(id),
            ),
        )
        DEAD_LETTERED.labels(stage, record.reason).inc()
        log.warning(
            "dead-lettered",
            extra={"record_id": str(id), "adapter": adapter, "reason": reason},
        )
        return receipt
