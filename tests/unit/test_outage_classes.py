"""The consumer runtime's classification, one exception class at a time.

An outage retries forever and never dead-letters; anything else is the record's
own failure (N tries, then the dead letter topic). Getting this wrong either way
is the bug: a NUL byte counted as an outage stalled a partition for good, and a
database restart counted as poison would throw good messages away.
"""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError
from sqlalchemy import exc as sa

from switchboard.consumer import Outage, PoisonRecord, is_outage
from switchboard.kafka import PublishError


def _pg(sqlstate: str, wrapper: type[sa.DBAPIError]) -> sa.DBAPIError:
    """A SQLAlchemy error wrapping the psycopg error class of this SQLSTATE."""
    error_class = psycopg.errors.lookup(sqlstate)
    return wrapper("SELECT 1", {}, error_class("from the server"))


@pytest.mark.parametrize(
    ("sqlstate", "wrapper", "what"),
    [
        ("08006", sa.OperationalError, "connection failure"),
        ("08001", sa.OperationalError, "cannot connect"),
        ("40001", sa.OperationalError, "serialization failure"),
        ("40P01", sa.OperationalError, "deadlock"),
        ("53300", sa.OperationalError, "too many connections"),
        ("57P01", sa.OperationalError, "admin shutdown (a restart)"),
        ("57014", sa.OperationalError, "statement timeout"),
        ("55P03", sa.OperationalError, "lock timeout"),
        ("58030", sa.OperationalError, "I/O error"),
    ],
)
def test_database_outages(sqlstate: str, wrapper: type[sa.DBAPIError], what: str) -> None:
    assert is_outage(_pg(sqlstate, wrapper)), what


@pytest.mark.parametrize(
    ("sqlstate", "wrapper", "what"),
    [
        ("22021", sa.DataError, "NUL byte / bad encoding"),
        ("22001", sa.DataError, "string too long"),
        ("22P02", sa.DataError, "invalid text representation"),
        ("23505", sa.IntegrityError, "unique violation"),
        ("23503", sa.IntegrityError, "foreign key violation"),
        ("42703", sa.ProgrammingError, "undefined column"),
    ],
)
def test_record_failures(sqlstate: str, wrapper: type[sa.DBAPIError], what: str) -> None:
    assert not is_outage(_pg(sqlstate, wrapper)), what


def test_the_nul_byte_psycopg_raises_without_a_sqlstate_is_the_records_fault() -> None:
    # psycopg refuses NUL on the client side: DataError, no SQLSTATE.
    nul = sa.DataError("INSERT", {}, psycopg.DataError("PostgreSQL text fields cannot contain NUL"))
    assert not is_outage(nul)


def test_a_lost_connection_without_a_sqlstate_is_an_outage() -> None:
    lost = sa.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
    assert is_outage(lost)
    invalidated = sa.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert is_outage(invalidated)


def test_sqlite() -> None:
    locked = sa.OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))
    assert is_outage(locked)
    unique = sa.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_outage(unique)


@pytest.mark.parametrize(
    "error",
    [
        KafkaTimeoutError("no ack"),
        KafkaConnectionError("refused"),
        NodeNotReadyError("broker 1"),
        PublishError("not acknowledged"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError("slow"),
        sa.TimeoutError("pool exhausted"),
        sa.DisconnectionError("dropped"),
        Outage("merged by another router"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_broker_network_and_handler_outages(error: Exception) -> None:
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("badly formed hexadecimal UUID string"),
        KeyError("owner"),
        TypeError("NoneType"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        RecursionError("too deep"),
        PoisonRecord("envelope-schema", "not a valid MessageRouted"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_everything_else_is_the_records_fault(error: Exception) -> None:
    assert not is_outage(error)
