"""Topic names (the contract between stages) and explicit topic creation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from switchboard.config import KafkaSettings

log = logging.getLogger(__name__)

INBOUND = "switchboard.inbound.v1"
"""Normalized inbound messages; key: the sender's identity key."""
ROUTED = "switchboard.routed.v1"
"""Routing decisions (message.routed, message.duplicate); key: contact id."""
CONTACTS = "switchboard.contacts.v1"
"""Contact lifecycle: created, identity linked, merged, owner assigned; key: contact id."""
DEADLETTER = "switchboard.deadletter.v1"
"""What could not be normalized or routed, with the reason and a raw reference."""

ALL_TOPICS: tuple[str, ...] = (INBOUND, ROUTED, CONTACTS, DEADLETTER)


@dataclass(frozen=True)
class TopicReport:
    created: tuple[str, ...]
    existing: tuple[str, ...]


def ensure_topics(
    settings: KafkaSettings,
    topics: tuple[str, ...] = ALL_TOPICS,
    *,
    wait_s: float = 30.0,
) -> TopicReport:
    """Create the missing topics with the configured partitions and replication.

    Idempotent and safe to race: a topic another process created meanwhile
    counts as existing. Retries while no broker answers, up to ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            admin = KafkaAdminClient(
                client_id=f"{settings.client_id}-admin",
                bootstrap_timeout_ms=2000,  # the library default blocks for 30 s
                **settings.client_config(),
            )
            break
        except KafkaTimeoutError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        created: list[str] = []
        for topic in missing:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name=topic,
                            num_partitions=settings.partitions,
                            replication_factor=settings.replication_factor,
                        )
                    ]
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
        if created:
            log.info(
                "created topics",
                extra={"topics": created, "partitions": settings.partitions},
            )
        return TopicReport(
            created=tuple(created), existing=tuple(t for t in topics if t not in created)
        )
    finally:
        admin.close()
