"""Which event loop a process runs (switchboard.bootstrap.event_loop_factory)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from switchboard.bootstrap import ROLES, event_loop_factory
from switchboard.settings import Settings


@pytest.mark.parametrize(
    "roles",
    [frozenset({"http"}), frozenset({"router"}), frozenset({"queue", "archive"})],
)
def test_processes_without_the_smtp_edge_run_uvloop(roles: frozenset[str]) -> None:
    factory = event_loop_factory(Settings(), roles)
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


@pytest.mark.parametrize("roles", [frozenset({"smtp"}), frozenset({"http", "smtp"}), ROLES])
def test_a_process_with_the_smtp_edge_keeps_asyncios_loop(roles: frozenset[str]) -> None:
    """aiosmtpd's STARTTLS swaps protocols through asyncio's own SSL internals."""
    assert event_loop_factory(Settings(), roles) is None
    with asyncio.Runner(loop_factory=event_loop_factory(Settings(), roles)) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)


def test_the_setting_asyncio_keeps_asyncios_loop_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWITCHBOARD_EVENT_LOOP", "asyncio")
    assert event_loop_factory(Settings(), frozenset({"http"})) is None
