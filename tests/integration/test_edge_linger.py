"""A process that runs an edge batches its producer for `edge_linger_ms`, others for
`linger_ms`: the edge's senders wait for every acknowledgement, the router's do not.

Built as `switchboard ingest http` and `switchboard router` build their processes
(``build_pipeline``), each publishing one event to the real broker, and the linger
read back from the kafka-python producer that sent it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from normalize.schema import InboundMessage
from switchboard.bootstrap import build_pipeline, producer_settings
from switchboard.config import KafkaSettings
from switchboard.events import TYPE_INBOUND, Event
from switchboard.settings import load_settings
from switchboard.topics import INBOUND
from tests.factories import inbound_message


def _linger_of_the_producer_that_sent(
    roles: frozenset[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kafka: KafkaSettings
) -> int:
    for name, value in {
        "SWITCHBOARD_KAFKA_BOOTSTRAP": kafka.bootstrap or "",
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path}/switchboard.db",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_HTTP_PORT": "0",
        "SWITCHBOARD_SMTP_ENABLED": "false",
        "SWITCHBOARD_KAFKA_LINGER_MS": "7",
        "SWITCHBOARD_KAFKA_EDGE_LINGER_MS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "switchboard.toml").write_text("")
    pipeline = build_pipeline(load_settings(tmp_path / "switchboard.toml"), roles)
    try:
        message: InboundMessage = inbound_message()
        event = Event(type=TYPE_INBOUND, source="/test", key=message.partition_key, data=message)
        pipeline.publisher.publish(INBOUND, event)
        producer = pipeline.publisher._installed()  # the producer that sent it
        assert producer is not None
        linger: int = producer.config["linger_ms"]
        return linger
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    ("role", "linger"),
    [("http", 2), ("router", 7)],  # SWITCHBOARD_KAFKA_EDGE_LINGER_MS=2, _LINGER_MS=7
)
def test_a_process_batches_for_the_linger_of_its_role(
    role: str,
    linger: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kafka_settings: KafkaSettings,
) -> None:
    sent = _linger_of_the_producer_that_sent(
        frozenset({role}), tmp_path, monkeypatch, kafka_settings
    )
    assert sent == linger


def test_a_process_of_every_role_answers_senders_so_it_takes_the_edge_linger() -> None:
    kafka = KafkaSettings(linger_ms=5, edge_linger_ms=1)
    assert producer_settings(kafka, frozenset({"router", "queue", "smtp"})).linger_ms == 1
    assert producer_settings(kafka, frozenset({"imap"})).linger_ms == 1
    assert producer_settings(kafka, frozenset({"router", "queue", "archive"})).linger_ms == 5
    assert kafka.linger_ms == 5  # a copy, not the caller's settings changed
