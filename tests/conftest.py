"""Shared fixtures: one real embedded broker per session, and PostgreSQL.

The broker is Tansu (memory storage) on a free loopback port; PostgreSQL is the
machine's server at 127.0.0.1:5432 (``.ci/run`` starts it). Neither is faked:
a test that needs them fails loudly when they are missing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from switchboard.broker import EmbeddedBroker
from switchboard.db import make_engine, upgrade
from switchboard.settings import KafkaSettings
from switchboard.topics import ensure_topics
from tests.dovecot import Dovecot, running_dovecot

POSTGRES_URL = os.environ.get(
    "SWITCHBOARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def kafka_settings(kafka_broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for the session broker, with the switchboard topics created."""
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap, partitions=3)
    ensure_topics(settings)
    return settings


@pytest.fixture
def unique() -> str:
    """A short unique suffix for group ids and names, so tests never share state."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def postgres_schema_url(postgres_engine: Engine, unique: str) -> Iterator[str]:
    """A database URL whose tables live in a fresh schema, dropped afterwards.

    Every test starts from an empty database, whatever earlier runs left behind.
    """
    schema = f"t_{unique}"
    with postgres_engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with postgres_engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def migrated_postgres(postgres_schema_url: str) -> Iterator[Engine]:
    """An engine on a fresh schema with every migration applied."""
    engine = make_engine(postgres_schema_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_engine() -> Iterator[Engine]:
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - turn any connect failure into a clear message
        pytest.fail(
            f"PostgreSQL is required at {POSTGRES_URL} (start it with "
            f"`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): {exc}"
        )
    yield engine
    engine.dispose()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server
