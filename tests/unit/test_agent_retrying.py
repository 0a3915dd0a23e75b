"""An agent's action is done again when it was rolled back for a reason that says
nothing about it: a contact changed under it, a deadlock, a serialization failure."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import exc as sa

from router.merges import MergeRefused, retrying
from router.store import Conflict
from switchboard.events import Event


def _pg(sqlstate: str) -> sa.DBAPIError:
    error_class = psycopg.errors.lookup(sqlstate)
    return sa.OperationalError("SELECT 1", {}, error_class("from the server"))


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)


@pytest.mark.parametrize(
    "error",
    [Conflict("merged meanwhile"), _pg("40P01"), _pg("40001")],
    ids=["conflict", "deadlock", "serialization failure"],
)
def test_retried_then_done(error: Exception) -> None:
    errors = [error, error]
    calls: list[int] = []
    done = Event(type="t", source="s", key="k", data=b"{}")

    def action() -> Event:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return done

    assert retrying(action) is done
    assert len(calls) == 3


@pytest.mark.parametrize(
    "error",
    [MergeRefused("already one contact"), _pg("23505"), _pg("08006")],
    ids=["refused", "unique violation", "connection failure"],
)
def test_not_retried(error: Exception) -> None:
    calls: list[int] = []

    def action() -> Event:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        retrying(action)
    assert len(calls) == 1


def test_given_up_after_five_attempts() -> None:
    calls: list[int] = []

    def action() -> Event:
        calls.append(1)
        raise _pg("40P01")

    with pytest.raises(sa.OperationalError):
        retrying(action)
    assert len(calls) == 5
