"""`[router] max_poll_records` bounds how many records one routing transaction takes.

A poll takes what has arrived: when routing is behind, batches grow to the
setting (fewer commits and reads per record); the setting is the ceiling. The
router here is the one `switchboard router` builds from its settings, on the real
broker and a SQLite file.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from normalize.schema import InboundMessage
from router.service import Router
from router.store import Outcome
from switchboard.bootstrap import build_pipeline
from switchboard.databases import upgrade
from switchboard.settings import KafkaSettings, load_settings
from tests.router_helpers import fresh_kafka, population, publish, wait_processed

TOML = """
[router]
max_poll_records = 7

[[teams]]
name = "support"
agents = ["alice", "bob"]
"""


def test_batch_size_from_the_settings_caps_every_routing_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pop = population(12, per_person=3)
    with fresh_kafka(partitions=1) as kafka:
        _use(monkeypatch, tmp_path, kafka)
        (tmp_path / "switchboard.toml").write_text(TOML)
        settings = load_settings(tmp_path / "switchboard.toml")
        assert settings.router.max_poll_records == 7
        # Everything is on the topic before the router starts: its first polls
        # could take it all if the setting did not hold them back.
        publish(kafka, pop.messages)
        pipeline = build_pipeline(settings, frozenset({"router"}))
        assert pipeline.router_engine is not None
        upgrade(pipeline.router_engine)
        router = next(c for c in pipeline.components if isinstance(c, Router))
        sizes: list[int] = []
        route_batch = router.store.route_batch

        def recording(batch: Sequence[InboundMessage]) -> list[Outcome]:
            sizes.append(len(batch))
            return route_batch(batch)

        monkeypatch.setattr(router.store, "route_batch", recording)
        router.routing.prepare()
        thread = threading.Thread(target=router.run_forever, daemon=True)
        thread.start()
        try:
            wait_processed(pipeline.router_engine, pop.ids, timeout_s=60)
        finally:
            router.request_stop()
            thread.join(20)
            pipeline.publisher.close(timeout_s=2)
    assert sum(sizes) >= len(pop.messages)
    assert max(sizes) == 7, sizes
    assert len(sizes) >= len(pop.messages) // 7


def _use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kafka: KafkaSettings) -> None:
    for name, value in {
        "SWITCHBOARD_KAFKA_BOOTSTRAP": kafka.bootstrap or "",
        "SWITCHBOARD_KAFKA_PARTITIONS": "1",
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path}/router.db",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_HTTP_PORT": "0",
    }.items():
        monkeypatch.setenv(name, value)
