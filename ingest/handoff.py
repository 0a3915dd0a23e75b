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
import concurrent.futures
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal, cast
from uuid import UUID

from pydantic import JsonValue

from ingest.errors import RetryLater
from ingest.evidence import EvidenceBudget
from ingest.groupcommit import GroupCommit
from ingest.journal import Journal
from ingest.spool import Spool, SpoolFull
from normalize.content import Blob, Normalized, Serialized, fit_for_event
from normalize.schema import (
    BlobRef,
    DeadLetter,
    InboundMessage,
    strip_controls,
    strip_controls_deep,
)
from switchboard.blobs import BlobStore
from switchboard.events import TYPE_DEADLETTER, TYPE_INBOUND, Event
from switchboard.kafka import Ack, Publisher, PublishError
from switchboard.metrics import ACCEPTED, DEAD_LETTERED, HANDOFF_SECONDS, SPOOLED, child
from switchboard.topics import DEADLETTER, INBOUND

log = logging.getLogger(__name__)

#: Most dead letters the journal keeps waiting for the archive (_room_for_dead_letters).
MAX_JOURNALED_DEAD_LETTERS = 10_000


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
        evidence: EvidenceBudget | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._publisher = publisher
        self.max_event_bytes = publisher.max_event_bytes
        # Only on the embedded broker (see ingest.journal): kept until the queue has it.
        self.journal = journal
        #: Dead letters journaled too, until the archive writes them (set by
        #: `switchboard run` when its archive runs: the one durable home they have).
        self.journal_dead_letters = False
        self._cap_logged_at = -math.inf
        self._source = source
        self.spool = spool
        self._spool_after_s = spool_after_s
        self.evidence = evidence or EvidenceBudget()
        # Blob writes wait on fsync, which releases the GIL: many can overlap. A pool of
        # their own keeps them from queueing behind CPU work on the default executor.
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="blob-io")
        self._blobs = blobs
        self._group = GroupCommit(blobs, self._io)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._blobs.close()  # the writer's pack: closed, so a collector may take it

    async def _store(self, blobs: tuple[Blob, ...]) -> None:
        if not blobs:
            return  # most SMS and forms: no hop to the blob threads for nothing
        try:
            # Group-committed with the blobs of the messages arriving meanwhile.
            await self._group.store(blobs)
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

    async def _publish_kept(
        self, topic: str, event: Event, message_id: str, journal: Journal | None
    ) -> Receipt:
        """Publish ``event``; with a journal, also keep it there, and return once both
        are durable. Serialized once, then fsynced while the broker acknowledges: in
        parallel."""
        if journal is None:
            return await self._publish(topic, event)
        event = replace(event, data=event.value())
        journaled = journal.submit(topic, event, message_id)
        receipt = await self._publish(topic, event)
        await self._journaled(journaled)
        return receipt

    @staticmethod
    async def _journaled(done: concurrent.futures.Future[None]) -> None:
        try:
            await asyncio.wrap_future(done)
        except OSError as exc:
            # Kafka may have it, but the memory broker may forget it: not durable yet.
            raise RetryLater(f"cannot journal the message: {exc}") from exc

    async def deliver(self, normalized: Normalized | Serialized) -> Receipt:
        """Make one normalized message durable; raise RetryLater if it is not."""
        if isinstance(normalized, Serialized) and normalized.elided:
            # A blob without its bytes must never be stored under its digest.
            raise ValueError("elided blobs not restored before the hand-off")
        started = time.perf_counter()
        await self._store(normalized.blobs)
        message: InboundMessage | Serialized
        data: InboundMessage | bytes
        if isinstance(normalized, Serialized):
            message, data = normalized, normalized.value
        else:
            message = data = fit_for_event(normalized.message)
        message_id = str(message.id)
        event = Event(
            type=TYPE_INBOUND,
            source=f"{self._source}/ingest/{message.adapter}",
            key=message.partition_key,
            data=data,
            subject=message_id,
        )
        size = len(event.value())
        if size > self.max_event_bytes:
            # Kafka would refuse it, and the spool would hold it in front of every
            # later message: kept as a dead letter with its raw blob instead.
            return await self.dead_letter(
                id=message.id,
                adapter=message.adapter,
                reason="too-large",
                detail=(
                    f"the event is {size} bytes, over the {self.max_event_bytes} an event "
                    "may be; the message is in its raw blob"
                ),
                stored_raw=message.raw,
                metadata={"dedupe_key": message.dedupe_key, "size": size},
            )
        receipt = await self._publish_kept(INBOUND, event, message_id, self.journal)
        log.info(
            "message accepted",
            extra={
                "message_id": message_id,
                "dedupe_key": message.dedupe_key,
                "channel": message.channel,
                "adapter": message.adapter,
                "spooled": receipt.spooled,
                "partition": receipt.ack.partition if receipt.ack else None,
                "offset": receipt.ack.offset if receipt.ack else None,
            },
        )
        child(HANDOFF_SECONDS, message.adapter).observe(time.perf_counter() - started)
        child(ACCEPTED, message.adapter, "spool" if receipt.spooled else "kafka").inc()
        return receipt

    async def refused(
        self,
        *,
        id: UUID,
        adapter: str,
        route: str,
        reason: str,
        detail: str,
        body: bytes,
        media_type: str,
        metadata: dict[str, JsonValue] | None = None,
    ) -> Receipt | None:
        """Keep bounded evidence of a refused request: the first bytes of its body,
        and only within the route's budget (None when over it: counted, not stored).
        The sender was refused; nothing here is the sender's message."""
        if not self.evidence.admit(route):
            return None
        clipped = self.evidence.clip(body)
        truncated = len(clipped) < len(body)
        facts: dict[str, JsonValue] = {
            **(metadata or {}),
            "size": len(body),
            "truncated": truncated,
        }
        if truncated:
            detail = f"{detail} (body truncated to its first {len(clipped)} of {len(body)} bytes)"
        return await self.dead_letter(
            id=id,
            adapter=adapter,
            reason=reason,
            detail=detail,
            raw=Blob.of(clipped, media_type),
            metadata=facts,
            promised=False,  # the sender was refused: nothing was promised
        )

    async def _room_for_dead_letters(self, journal: Journal) -> bool:
        """Whether the journal holds fewer than MAX_JOURNALED_DEAD_LETTERS (they leave
        it once archived: more means the archive cannot write, and each start would
        replay them all; review of 2026-12-01)."""
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(self._io, journal.count, DEADLETTER)
        if held < MAX_JOURNALED_DEAD_LETTERS:
            return True
        now = time.monotonic()
        if now - self._cap_logged_at > 60:
            self._cap_logged_at = now
            log.error(
                "the journal holds %d dead letters the archive has not written: new ones "
                "go to the broker only; is the archive failing?",
                held,
            )
        return False

    async def dead_letter(
        self,
        *,
        id: UUID,
        adapter: str,
        reason: str,
        detail: str,
        raw: Blob | None = None,
        stored_raw: BlobRef | None = None,
        stage: Literal["ingest", "normalize", "router", "sink"] = "ingest",
        metadata: dict[str, JsonValue] | None = None,
        promised: bool = True,
    ) -> Receipt:
        """Record what could not become a message, with the raw bytes kept (``raw``
        is stored here; ``stored_raw`` names a blob already stored)."""
        if raw is not None:
            await self._store((raw,))
        record = DeadLetter(
            id=id,
            stage=stage,
            adapter=adapter,
            # What a sender sent may be quoted here: no control characters (the
            # schema refuses them, and a dead letter must never fail to be written).
            reason=strip_controls(reason)[:64] or "unknown",
            detail=strip_controls(detail, body=True)[:4000],
            occurred_at=datetime.now(UTC),
            raw=raw.ref if raw is not None else stored_raw,
            metadata=cast("dict[str, JsonValue]", strip_controls_deep(metadata or {})),
        )
        event = Event(
            type=TYPE_DEADLETTER,
            source=f"{self._source}/ingest/{adapter}",
            key=f"deadletter:{adapter}",
            data=record,
            subject=str(id),
        )
        # "Kept for review" is a promise too: on the embedded broker the record stays
        # in the journal until the archive has written it to a file.
        journal = self.journal if promised and self.journal_dead_letters else None
        if journal is not None and not await self._room_for_dead_letters(journal):
            journal = None
        receipt = await self._publish_kept(DEADLETTER, event, str(id), journal)
        DEAD_LETTERED.labels(stage, record.reason).inc()
        log.warning(
            "dead-lettered",
            extra={"record_id": str(id), "adapter": adapter, "reason": reason},
        )
        return receipt
