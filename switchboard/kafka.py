"""Kafka client factory: the publisher every stage uses, and consumer groups.

The publisher returns only once the broker acknowledged the record with
``acks=all``: that acknowledgement is what lets ingest answer a sender.

kafka-python's idempotent producer goes into a fatal state after a broker
restart (measured on Tansu: one ``UnknownProducerIdError``, then every send
fails with a generic ``KafkaError``). A producer that reports a non-retriable
error is therefore thrown away and a fresh one is built for the next send, and
a publish that hit such an error is retried once on the fresh producer while
its deadline allows. A producer whose publish timed out is thrown away too:
measured on Tansu, after a restart it can also loop on "UnknownProducerIdError
... resetting sequence and retrying" (retriable) until the delivery timeout,
and the next record would do the same. Redelivery is safe: every event has a stable id and
consumers are idempotent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from switchboard.config import KafkaSettings
from switchboard.events import Event
from switchboard.metrics import PUBLISHED, child

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ack:
    """Where the broker stored an acknowledged event."""

    topic: str
    partition: int
    offset: int


def _ack(metadata: object) -> Ack:
    return Ack(
        topic=str(getattr(metadata, "topic", "")),
        partition=int(getattr(metadata, "partition", -1)),
        offset=int(getattr(metadata, "offset", -1)),
    )


class _WouldBlock(Exception):
    """A send on the event loop reached kafka-python's wait for metadata."""


_ON_LOOP = threading.local()


class _Producer(KafkaProducer):  # type: ignore[misc]
    """kafka-python's producer, except that a send made on the event loop never
    waits for metadata: the check in :meth:`Publisher._ready` and send()'s own can
    disagree when the producer's I/O thread replaces the topic table in between
    (a topic deleted, or gone with a memory broker), and that wait is
    ``max_block_ms`` of a frozen event loop. The send then goes to the thread.
    ``_wait_on_metadata`` is kafka-python's private method (3.0); the test
    ``test_a_topic_gone_between_the_check_and_the_send_does_not_freeze_the_loop``
    (tests/integration/test_kafka.py) fails if it is renamed."""

    def _wait_on_metadata(self, topic: str, max_wait_ms: int) -> object:
        if getattr(_ON_LOOP, "active", False):
            raise _WouldBlock(topic)
        return super()._wait_on_metadata(topic, max_wait_ms)


#: Keys whose hash a partitioner keeps, and the longest it keeps: a sender's key is
#: chosen by the sender (an address of up to 320 characters), so both are bounded.
KEY_HASHES = 16_384
KEY_HASHED_BYTES = 96


def _key_hash(key: bytes) -> int:
    """Java's murmur2 of a record key, made positive, as kafka-python's default uses it."""
    return int(murmur2(key)) & 0x7FFFFFFF


class KeyPartitioner(DefaultPartitioner):  # type: ignore[misc]
    """kafka-python's default partitioner, short keys' hashes remembered.

    A keyed record goes where the default puts it (Java's murmur2 of the key over
    all the topic's partitions, sorted), so the partition of a contact's records
    does not depend on which Switchboard version or which Kafka client wrote them.
    The default hashes the key in pure Python and builds the topic's partition
    sets twice on every send: 4.7 µs a record here, of a send of about 25
    (2026-12-02). A key of at most ``KEY_HASHED_BYTES`` is hashed once while it is
    remembered (the ``KEY_HASHES`` most recent: 4.9 MB at the longest, measured
    with tracemalloc), as ``normalize.identity`` caches addresses; a key not yet
    seen, or longer, costs the hash (3 µs for a phone number's, 8 for a 50-byte
    address's).
    """

    def __init__(self) -> None:
        self._hash = functools.lru_cache(maxsize=KEY_HASHES)(_key_hash)

    def partition(  # noqa: PLR0917 - kafka-python's signature
        self,
        topic: str,
        key: object,
        serialized_key: bytes | None,
        value: object,
        serialized_value: bytes | None,
        cluster: Any,  # noqa: ANN401 - kafka-python's ClusterMetadata
    ) -> int:
        if serialized_key is None:
            chosen: int = super().partition(
                topic, key, serialized_key, value, serialized_value, cluster
            )
            return chosen
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        long = len(serialized_key) > KEY_HASHED_BYTES
        hashed = _key_hash(serialized_key) if long else self._hash(serialized_key)
        ordered = sorted(partitions)
        return int(ordered[hashed % len(ordered)])


def new_producer(s: KafkaSettings, client_id: str) -> KafkaProducer:
    """A kafka-python producer as every Publisher builds one: ``acks=all``,
    idempotent, batched as ``s`` says (``bench/broker_latency.py`` times one alone).
    kafka-python's own metrics are off: nothing reads them (Switchboard counts in
    Prometheus), and recording them cost its network thread a fifth of its time a
    produce request of up to 16 records (``bench/producer_batches.py``, 2026-12-02)."""
    return _Producer(
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        partitioner=KeyPartitioner(),
        metrics_enabled=False,
        linger_ms=s.linger_ms,
        batch_size=s.batch_size,
        max_block_ms=s.max_block_ms,
        bootstrap_timeout_ms=s.max_block_ms,
        delivery_timeout_ms=max(s.delivery_timeout_ms, s.request_timeout_ms + s.linger_ms),
        max_request_size=s.max_request_size,
        **s.client_config(),
    )


class PublishError(Exception):
    """The broker did not acknowledge in time, or refused. Retry later (or spool)."""


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


class Publisher:
    """Thread-safe producer wrapper: ``publish`` blocks, ``apublish`` awaits.

    ``on_new_producer`` runs before each producer after the first is built; the
    runtime uses it to recreate topics an in-memory broker lost in a restart.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        client_id: str | None = None,
        on_new_producer: Callable[[], object] | None = None,
    ) -> None:
        self._settings = settings
        self._client_id = client_id or f"{settings.client_id}-producer"
        self._on_new_producer = on_new_producer
        self._lock = threading.Lock()  # guards the fields below; held only briefly
        self._build_lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._built = 0
        self._closed = False
        # send() can block up to max_block_ms while a topic's metadata is missing
        # (a new producer, a broker away): apublish then sends from this thread, off
        # the event loop; once the topic is known it appends on the loop (_ready).
        self._send_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-send")

    @property
    def producers_built(self) -> int:
        """How many producers were built so far (1 + recoveries)."""
        return self._built

    def _new_producer(self) -> KafkaProducer:
        return new_producer(self._settings, self._client_id)

    def _current(self) -> KafkaProducer:
        # Building a producer bootstraps over the network (seconds while the broker
        # is away). `_lock` is also taken on the event loop (`_discard` from
        # apublish), so it is never held across that: the build is serialized by
        # `_build_lock`, which only sending threads take. Holding `_lock` there
        # once froze an SMTP server's event loop for 9 s during a broker outage.
        existing = self._installed()
        if existing is not None:
            return existing
        with self._build_lock:
            existing = self._installed()  # built by another thread meanwhile
            if existing is not None:
                return existing
            if self._built and self._on_new_producer is not None:
                self._on_new_producer()
            try:
                producer = self._new_producer()
            except KafkaError as exc:
                raise PublishError(f"cannot connect to Kafka: {exc}") from exc
            with self._lock:
                installed = not self._closed
                if installed:
                    self._producer = producer
                    self._built += 1
            if not installed:
                _close_quietly(producer)
                raise PublishError("publisher is closed")
            return producer

    @property
    def max_event_bytes(self) -> int:
        """The largest event value this publisher can send: Kafka refuses a produce
        request over ``max_request_size``, and the headers and the batch's own
        framing take a little of it."""
        return self._settings.max_request_size - 64 * 1024

    def _installed(self) -> KafkaProducer | None:
        with self._lock:
            if self._closed:
                raise PublishError("publisher is closed")
            return self._producer

    def _discard(self, producer: KafkaProducer, cause: BaseException) -> None:
        with self._lock:
            if self._producer is not producer:
                return  # someone else already replaced it
            self._producer = None
        log.warning(
            "kafka producer failed or timed out; building a new one",
            extra={"error": repr(cause)},
        )
        threading.Thread(
            target=_close_quietly, args=(producer,), daemon=True, name="kafka-close"
        ).start()

    def _send(self, topic: str, event: Event) -> tuple[KafkaProducer, Any]:
        return self._send_with(self._current(), topic, event)

    def _ready(self, topic: str) -> KafkaProducer | None:
        """The installed producer when a send to ``topic`` cannot block, else None.

        kafka-python's ``send()`` waits (up to ``max_block_ms``) only for a topic
        whose partitions it does not know yet; its 3.x accumulator has no memory
        wait, and waking its sender is a non-blocking socket write. Its metadata is
        private API: when the attribute is not there, every send takes the thread.
        """
        with self._lock:
            producer = None if self._closed else self._producer
        if producer is None:
            return None
        partitions = getattr(getattr(producer, "_metadata", None), "partitions_for_topic", None)
        if partitions is None or partitions(topic) is None:
            return None
        return producer

    def _send_with(
        self, producer: KafkaProducer, topic: str, event: Event
    ) -> tuple[KafkaProducer, Any]:
        try:
            future = producer.send(
                topic, key=event.key.encode(), value=event.value(), headers=event.headers()
            )
        except KafkaError as exc:
            if not _retriable(exc):
                self._discard(producer, exc)
            raise PublishError(f"send to {topic} failed: {exc}") from exc
        except (ValueError, KeyError) as exc:
            # kafka-python's partitioner, when the topic's partitions change under it
            # (a metadata update racing the send): the caller spools or retries, as
            # for any publish that did not happen; the producer itself is fine.
            raise PublishError(f"send to {topic} failed: {exc!r}") from exc
        return producer, future

    def publish(self, topic: str, event: Event, timeout_s: float | None = None) -> Ack:
        """Publish one event; return where it was stored once acknowledged."""
        return self.publish_many([(topic, event)], timeout_s)[0]

    def publish_many(
        self, items: Sequence[tuple[str, Event]], timeout_s: float | None = None
    ) -> list[Ack]:
        """Publish several events as one batch and wait for every acknowledgement.

        Raises :class:`PublishError` if any of them is not acknowledged; some may
        have been written anyway, which is why every event id is stable.
        """
        deadline = time.monotonic() + (timeout_s or self._settings.publish_timeout_s)
        for attempt in (1, 2):
            try:
                return self._publish_once(items, deadline)
            except _FatalProducerError as exc:
                if attempt == 2 or time.monotonic() >= deadline:
                    raise PublishError(str(exc.__cause__ or exc)) from exc.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def _publish_once(self, items: Sequence[tuple[str, Event]], deadline: float) -> list[Ack]:
        sent = [self._send(topic, event) for topic, event in items]
        results = []
        for producer, future in sent:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                results.append(_ack(future.get(timeout=remaining)))
                child(PUBLISHED, results[-1].topic).inc()
            except KafkaError as exc:
                # Retriable errors surface only once kafka-python gave up retrying;
                # after a broker restart that is an UnknownProducerIdError loop it
                # never leaves. Either way this producer is done.
                self._discard(producer, exc)
                if not _retriable(exc):
                    raise _FatalProducerError() from exc
                raise PublishError(f"not acknowledged: {exc}") from exc
        return results

    async def _asend(self, topic: str, event: Event, deadline: float) -> tuple[KafkaProducer, Any]:
        """Append the record to a producer: on the event loop when the topic's metadata
        is there, else on the send thread, which may wait for it (bounded by ``deadline``)."""
        # send() blocks while there is no metadata (broker away); the caller's
        # bound covers that wait too. A send that completes after the bound may
        # still write the record: harmless, its id is stable.
        ready = self._ready(topic)
        sent = None
        if ready is not None:
            # The common case: a record appended on the event loop, no thread hop.
            _ON_LOOP.active = True
            try:
                sent = self._send_with(ready, topic, event)
            except _WouldBlock:
                sent = None  # the topic's metadata went meanwhile: the thread waits
            finally:
                _ON_LOOP.active = False
        if sent is not None:
            return sent
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._send_thread, self._send, topic, event),
                max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError as exc:
            raise PublishError(f"Kafka did not take the record for {topic} in time") from exc

    async def apublish(self, topic: str, event: Event, timeout_s: float | None = None) -> Ack:
        """Async publish: resolves when the broker acknowledged the event."""
        deadline = time.monotonic() + (timeout_s or self._settings.publish_timeout_s)
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            producer, future = await self._asend(topic, event, deadline)
            waiter: asyncio.Future[Ack] = loop.create_future()

            def _ok(metadata: object, w: asyncio.Future[Ack] = waiter) -> None:
                loop.call_soon_threadsafe(_resolve, w, _ack(metadata), None)

            def _err(exc: BaseException, w: asyncio.Future[Ack] = waiter) -> None:
                loop.call_soon_threadsafe(_resolve, w, None, exc)

            future.add_callback(_ok)
            future.add_errback(_err)
            # One timer that fails the waiter at the deadline: neither wait_for's extra
            # task nor asyncio.timeout's context manager (which showed in every profile
            # of an edge: it reschedules and cancels the caller's task).
            expiry = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter)
            try:
                ack = await waiter
            except TimeoutError as exc:
                # Possibly stuck in the restart loop described in publish_many: the
                # next send gets a fresh producer.
                self._discard(producer, exc)
                raise PublishError(f"no acknowledgement from Kafka for {topic} in time") from exc
            except KafkaError as exc:
                if _retriable(exc):
                    raise PublishError(f"not acknowledged: {exc}") from exc
                self._discard(producer, exc)
                if attempt == 2 or time.monotonic() >= deadline:
                    raise PublishError(f"not acknowledged: {exc}") from exc
            else:
                child(PUBLISHED, topic).inc()
                return ack
            finally:
                expiry.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    def flush(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            producer = self._producer
        if producer is not None:
            try:
                producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                log.warning("flush did not complete", extra={"error": repr(exc)})

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is buffered (bounded) and close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, self._producer = self._producer, None
        self._send_thread.shutdown(wait=False, cancel_futures=True)
        if producer is not None:
            producer.close(timeout=timeout_s)


def _close_quietly(producer: KafkaProducer) -> None:
    """Close a discarded producer, dropping what it still holds (callers were told)."""
    try:
        producer.close(timeout=0)
    except KafkaError:
        # kafka-python 3.0's close() raises from its flush() while records are
        # pending, before it force-closes its sender thread; without this the
        # thread lives on and __del__ raises the same error later.
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(5)
        with contextlib.suppress(KafkaError):
            producer.close(timeout=1)


class _FatalProducerError(Exception):
    """Internal: the producer was discarded; the caller may retry on a new one."""


def _expire(waiter: asyncio.Future[Ack]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _resolve(waiter: asyncio.Future[Ack], result: Ack | None, exc: BaseException | None) -> None:
    if waiter.done():
        return
    if exc is not None:
        waiter.set_exception(exc)
    elif result is not None:
        waiter.set_result(result)


def make_consumer(
    settings: KafkaSettings,
    *,
    group_id: str,
    topics: Sequence[str],
    client_id: str | None = None,
    listener: ConsumerRebalanceListener | None = None,
    **overrides: object,
) -> KafkaConsumer:
    """A consumer-group member with manual commits and embedded-broker-safe timing.

    Offsets are never auto-committed: each consumer commits only after its
    effects are durable. Poll with ``settings.poll_timeout_ms`` (>= 1500 ms).
    """
    config: dict[str, Any] = {
        "group_id": group_id,
        "client_id": client_id or f"{settings.client_id}-{group_id}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        **settings.client_config(),
    }
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    if listener is not None:
        consumer.subscribe(list(topics), listener=listener)
    else:
        consumer.subscribe(list(topics))
    return consumer


def probe_broker(settings: KafkaSettings, timeout_s: float = 1.0) -> None:
    """Raise unless a bootstrap broker answers a Kafka ApiVersions request.

    A protocol round trip, not just a TCP connect: a stalled broker still
    accepts connections. TLS/SASL listeners are only checked for a connect.
    """
    errors: list[str] = []
    for server in settings.bootstrap_servers():
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
                if settings.security_protocol != "PLAINTEXT":
                    return
                sock.settimeout(timeout_s)
                client = b"switchboard-probe"
                # ApiVersions v0: api_key=18, api_version=0, correlation_id, client_id
                body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
                sock.sendall(struct.pack(">i", len(body)) + body)
                header = _recv_exact(sock, 10)  # size, correlation id, error code
                _size, correlation, error = struct.unpack(">iih", header)
                if correlation == 7 and error == 0:
                    return
                errors.append(f"{server}: ApiVersions error {error}")
        except (OSError, ValueError, struct.error) as exc:
            errors.append(f"{server}: {exc}")
    raise ConnectionError("no Kafka broker answered: " + "; ".join(errors))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data
