"""The selector under kafka-python's clients: the platform's default, except that
looking up a socket it does not hold costs no repr (switchboard/selector.py)."""

from __future__ import annotations

import selectors
import socket

import pytest

from switchboard.config import KafkaSettings
from switchboard.selector import QuietSelector


class Counted:
    """A file object that counts how often it is formatted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reprs = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def __repr__(self) -> str:
        self.reprs += 1
        return "<counted>"


def test_a_socket_not_held_raises_key_error_without_being_formatted() -> None:
    a, b = socket.socketpair()
    selector = QuietSelector()
    try:
        counted = Counted(a)
        with pytest.raises(KeyError) as raised:
            selector.get_key(counted)
        assert counted.reprs == 0
        assert raised.value.args == (counted,)  # formatted only if someone shows it
        selector.register(counted, selectors.EVENT_READ, "data")
        assert selector.get_key(counted).data == "data"
        b.send(b"x")
        assert [key.data for key, _ in selector.select(1)] == ["data"]
        selector.unregister(counted)
        with pytest.raises(KeyError):
            selector.get_key(counted)
        assert counted.reprs == 0
    finally:
        selector.close()
        a.close()
        b.close()
    with pytest.raises(RuntimeError, match="closed"):
        selector.get_key(a)


def test_the_standard_selector_would_have_formatted_it() -> None:
    """What the quiet selector saves (if the standard library changes, this says so)."""
    a, b = socket.socketpair()
    selector = selectors.DefaultSelector()
    try:
        counted = Counted(a)
        with pytest.raises(KeyError):
            selector.get_key(counted)
        assert counted.reprs >= 1
    finally:
        selector.close()
        a.close()
        b.close()


def test_every_kafka_client_gets_it() -> None:
    assert KafkaSettings(bootstrap="k:9092").client_config()["selector"] is QuietSelector
