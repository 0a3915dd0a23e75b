"""Engine factory against the real PostgreSQL and a SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from switchboard.db import make_engine, normalize_url, ping

pytestmark = pytest.mark.integration


def test_postgres_answers_through_psycopg3(postgres_engine: Engine) -> None:
    ping(postgres_engine)
    assert postgres_engine.dialect.driver == "psycopg"
    with postgres_engine.connect() as connection:
        version = connection.execute(text("SHOW server_version")).scalar_one()
    assert int(str(version).split(".")[0]) >= 12


def test_sqlite_file_is_created_with_durable_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'sb.db'}")
    try:
        ping(engine)
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert connection.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
            assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()
    assert (tmp_path / "nested" / "sb.db").is_file()


def test_unreachable_database_fails_the_ping() -> None:
    engine = make_engine(
        "postgresql://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    with pytest.raises(Exception, match="connect"):
        ping(engine)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_bare_postgres_urls_use_psycopg3(url: str, expected: str) -> None:
    assert normalize_url(url) == expected
