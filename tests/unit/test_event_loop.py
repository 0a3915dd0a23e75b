"""Which event loop a process runs (switchboard.bootstrap.event_loop_factory)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from switchboard.bootstrap import event_loop_factory
from switchboard.settings import Settings


def test_every_process_runs_uvloop() -> None:
    """The SMTP edge's too: aiosmtpd's STARTTLS works on uvloop's transports
    (tests/integration/test_smtp.py runs it on both loops)."""
    factory = event_loop_factory(Settings())
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_the_setting_asyncio_keeps_asyncios_loop_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWITCHBOARD_EVENT_LOOP", "asyncio")
    assert event_loop_factory(Settings()) is None
